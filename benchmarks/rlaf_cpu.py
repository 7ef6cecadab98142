"""RLAF on a laptop CPU: train the bundled model on the ``local-cpu`` preset, then compare.

Trains stage 2 on the bundled seed instructions minus a held-out set, then writes one
instance for each held-out instruction with the base policy and with the trained policy
(same prompts, same sampling seeds) and scores both with the same composite reward. The
last line printed is one JSON object: steps, the mean composite reward of the first and
last five training steps, the held-out means, peak resident memory and wall time.
Targets on the local-cpu preset: peak_rss_gb ≤ 6 and seconds ≤ 900.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from refine_af import records
from refine_af.config import RunConfig, load_config
from refine_af.data import seed_tasks_path
from refine_af.feedback import CompositeReward, build_scorers
from refine_af.generation import SamplingParams, TransformersBackend
from refine_af.instances_format import STOP, build_prompt, parse_completion
from refine_af.records import InstructionRecord, SeedTask
from refine_af.stages import rlaf


def split_instructions(
    heldout: int, seed: int
) -> tuple[list[InstructionRecord], list[InstructionRecord]]:
    """The bundled seed tasks as instruction records: (training set, held-out set)."""
    seeds = records.read_records(seed_tasks_path(), SeedTask)
    pool = [
        InstructionRecord(
            id=s.id, instruction=s.instruction, is_classification=s.is_classification, source="seed"
        )
        for s in seeds
    ]
    random.Random(seed).shuffle(pool)
    return pool[heldout:], pool[:heldout]


def heldout_reward(
    config: RunConfig, policy: str, instructions: list[InstructionRecord], reward: CompositeReward
) -> tuple[float, int]:
    """Mean composite reward of one instance per instruction, and how many got the floor."""
    settings = config.stage2
    backend = TransformersBackend.from_reference(
        policy, dtype=config.model.dtype, device=config.model.device, batch_size=len(instructions)
    )
    params = SamplingParams(
        max_new_tokens=settings.max_completion_length,
        temperature=settings.temperature,
        top_p=settings.top_p,
        stop=STOP,
        seed=settings.seed,
    )
    prompts = [build_prompt(r.instruction, r.is_classification) for r in instructions]
    completions = backend.generate(prompts, params)
    parsed = [
        parse_completion(
            r.instruction, r.is_classification, c.text, finished=c.finish_reason == "stop"
        )
        for r, c in zip(instructions, completions, strict=True)
    ]
    batch = reward(parsed)
    return sum(batch.rewards) / len(batch.rewards), sum(batch.failure_counts().values())


def report(step: int, total: int, metrics: dict[str, float]) -> None:
    if "reward" in metrics:
        print(f"step {step}/{total} reward {metrics['reward']:.4f}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="local-cpu", help="preset name or YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a.b=c")
    parser.add_argument("--heldout", type=int, default=20, help="held-out instructions")
    parser.add_argument("--out", type=Path, default=None, help="keep the run here")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads is not None:  # on a shared machine, fewer threads than cores spin less
        torch.set_num_threads(args.threads)

    started = time.monotonic()
    # the preset's step count is sized for `make run`; the benchmark trains 20 unless told
    config = load_config(args.config, ["stage2.max_steps=20", *args.overrides])
    if config.stage2.max_steps < 20:
        parser.error("the benchmark trains at least 20 steps (stage2.max_steps)")
    work = args.out or Path(tempfile.mkdtemp(prefix="rlaf-bench-"))
    train, heldout = split_instructions(args.heldout, config.stage2.seed)
    instructions_path = work / "instructions.jsonl"
    records.write_jsonl(instructions_path, train)
    result = rlaf.run(
        config, instructions_path, work / "rlaf", workspace=work / "workspace", on_step=report
    )

    names = [c.scorer for c in config.stage2.reward.components]
    reward = CompositeReward.from_settings(
        config.stage2.reward, build_scorers(config.stage2.scorers, names)
    )
    base, base_floored = heldout_reward(config, config.model.base, heldout, reward)
    adapter = str(result.out_dir / rlaf.ADAPTER_DIR)
    trained, trained_floored = heldout_reward(config, adapter, heldout, reward)

    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    summary = result.summary
    print(
        json.dumps(
            {
                "bench": "rlaf_cpu",
                "steps": summary["steps"],
                "reward_first5": summary["reward_first5"],
                "reward_last5": summary["reward_last5"],
                "heldout_base": round(base, 4),
                "heldout_rl": round(trained, 4),
                "heldout_floored_base": base_floored,
                "heldout_floored_rl": trained_floored,
                "heldout": len(heldout),
                "threads": torch.get_num_threads(),
                "peak_rss_gb": round(peak_rss_gb, 2),
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
