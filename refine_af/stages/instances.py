"""Stage 3: instances for stage 1's instructions, written by the stage 2 policy.

Each instruction gets ``samples_per_instruction`` sampled completions of the same prompt
stage 2 trained on, in ``stage3.format``: several instances per completion as Self-Instruct
writes them, or one each (input-first, or output-first for classification tasks;
``refine_af.instances_format``); Self-Instruct's post-processing sorts them into kept,
filtered and quarantined, and stage 2's composite reward scores every kept example. With no
adapter the base model writes them: the paper's baseline.

Instructions are generated in fixed blocks (``refine_af.sharding``): a shard is a range of
blocks, and every finished block is appended to the output folder's journal
(``refine_af.journal``), so a killed run continues from its last finished block and ends
with the same records as an uninterrupted one. ``merge`` (``refine_af.stages.merge``) joins
shards into the same bytes as one unsharded run.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refine_af import journal, models, records, storage, threads, tracking
from refine_af.config import RunConfig
from refine_af.endpoint import judge_endpoint
from refine_af.errors import InputError
from refine_af.feedback import CompositeReward, build_scorers
from refine_af.generation import GenerationBackend, backend_for
from refine_af.instance_writer import InstanceWriter, Part
from refine_af.instances_dataset import (
    ADAPTER_WEIGHTS,
    SHARD_INFO,
    InstancesResult,
    adapter_reference,
    file_sha256,
    finalize,
    log_summary,
    summary_of,
    write_records,
)
from refine_af.records import InstructionRecord
from refine_af.sharding import Shard, assigned_blocks
from refine_af.stages.merge import merge

# what the command line, the KFP components and the tests reach through this module
__all__ = [
    "ADAPTER_WEIGHTS",
    "Inputs",
    "InstancesResult",
    "Part",
    "Shard",
    "assigned_blocks",
    "check_adapter",
    "execute",
    "load_instructions",
    "merge",
    "policy_reference",
    "read_inputs",
    "run",
]

# endpoint settings that change how requests are made, not what they return
_TRANSPORT = {"max_concurrency", "timeout", "max_retries", "api_key_env"}
MAY_CHANGE = "generation.endpoint's " + ", ".join(sorted(_TRANSPORT))

# ---------------------------------------------------------------- inputs


def load_instructions(path: str | Path, config: RunConfig) -> list[InstructionRecord]:
    """Stage 1's instructions of the configured sources, in file order."""
    every = records.read_records(path, InstructionRecord, config.limits.by_field())
    duplicates = sorted(k for k, n in Counter(r.id for r in every).items() if n > 1)
    if duplicates:
        raise InputError(f"{path}: instruction ids must be unique; repeated: {duplicates[:5]}")
    sources = config.stage3.sources
    chosen = [r for r in every if r.source in sources]
    if not chosen:
        raise InputError(f"{path}: no instructions from {' or '.join(sources)} (stage3.sources)")
    return chosen


@dataclass(frozen=True)
class Inputs:
    """The validated instructions file: its digest and the blocks this run writes."""

    path: str
    sha256: str
    shard: Shard | None
    blocks: list[list[InstructionRecord]]

    @property
    def total(self) -> int:
        return sum(len(block) for block in self.blocks)


def read_inputs(config: RunConfig, path: str | Path, shard: Shard | None = None) -> Inputs:
    """Read and validate the instructions once; every later step uses the result."""
    blocks = assigned_blocks(load_instructions(path, config), config, shard)
    return Inputs(str(path), file_sha256(path), shard, blocks)


def policy_reference(config: RunConfig) -> str:
    """What writes the instances: stage 2's adapter (on its base) or the base model."""
    return config.stage3.adapter or config.model.base


def check_adapter(config: RunConfig) -> None:
    """A configured adapter must be a LoRA folder trained on ``model.base``."""
    adapter = config.stage3.adapter
    if adapter is None:
        return
    if models.adapter_base(models.resolve(adapter)) is None:
        raise InputError(
            f"stage3.adapter {adapter!r} is not a LoRA adapter folder (no adapter_config.json); "
            "pass stage 2's out/adapter"
        )
    models.adapter_base_location(adapter, expected_base=config.model.base)


# ---------------------------------------------------------------- resume


def resume_key(config: RunConfig, inputs: Inputs) -> dict[str, Any]:
    """What shapes the records, so must match to continue a journal: the model, sampling,
    stage 3 and reward settings, the input limits, the instructions and the shard."""
    generation = config.generation.model_dump(mode="json", exclude={"endpoint": _TRANSPORT})
    return {
        "model": config.model.model_dump(mode="json"),
        "generation": generation,
        "stage3": config.stage3.model_dump(mode="json"),
        "stage2": config.stage2.model_dump(mode="json", include={"reward", "scorers"}),
        "limits": config.limits.model_dump(mode="json"),
        "instructions_sha256": inputs.sha256,
        "shard": f"{inputs.shard.index}/{inputs.shard.count}" if inputs.shard else None,
    }


def finished_blocks(events: Sequence[dict[str, Any]]) -> tuple[dict[tuple[str, ...], Part], float]:
    """The journal's finished blocks (by their instruction ids) and the seconds they took."""
    done = {tuple(e["ids"]): Part.from_json(e["part"]) for e in events if e["event"] == "block"}
    seconds = sum(e["seconds"] for e in events if e["event"] == "block")
    return done, seconds


# ---------------------------------------------------------------- running the stage


def run(
    config: RunConfig,
    instructions: str | Path | Inputs,
    out_dir: Path,
    backend: GenerationBackend,
    reward: CompositeReward,
    *,
    workspace: Path,
    shard: Shard | None = None,
    adapter_uri: str | None = None,
    on_block: Callable[[int, int, Part], None] | None = None,
    force_resume: bool = False,
) -> InstancesResult:
    """Write instances for the instructions (a path, or ``read_inputs``' result for it).

    Without ``shard`` the folder gets the whole dataset (records, exports, card). With it,
    the shard's records and ``shard.json`` for ``merge``. Blocks already in the folder's
    journal are not generated again (a journal of other settings is refused unless
    ``force_resume``); the outputs are written at the end. ``on_block(instructions done,
    instructions in total, part so far)`` shows progress.
    """
    started = time.monotonic()
    inputs = instructions if isinstance(instructions, Inputs) else read_inputs(
        config, instructions, shard
    )  # fmt: skip
    writer = InstanceWriter(config, backend, reward)
    out_dir.mkdir(parents=True, exist_ok=True)
    journal_path, events = journal.open_journal(
        out_dir,
        resume_key(config, inputs),
        config.config_hash(),
        force_resume=force_resume,
        may_change=MAY_CHANGE,
    )
    done, seconds_before = finished_blocks(events)
    tags = {"refine_af.config_hash": config.config_hash(), "refine_af.policy": writer.policy}
    if inputs.shard is not None:
        tags["refine_af.shard"] = f"{inputs.shard.index}/{inputs.shard.count}"
    with tracking.stage_run(
        "instances", workspace, config.to_dict(), tags=tags, out_dir=out_dir
    ) as stage_run:
        part = Part()
        for block in inputs.blocks:
            ids = tuple(r.id for r in block)
            if (written := done.get(ids)) is None:
                block_started = time.monotonic()
                written = writer.block(block)
                event = {
                    "event": "block",
                    "ids": list(ids),
                    "seconds": round(time.monotonic() - block_started, 3),
                    "part": written.to_json(),
                }
                records.append_jsonl(journal_path, [event])
            part.extend(written)
            if on_block is not None:
                on_block(part.instructions, inputs.total, part)
        summary = summary_of(
            config,
            part,
            adapter=adapter_reference(config.stage3.adapter, adapter_uri),
            instructions_sha256=inputs.sha256,
            shards=inputs.shard.count if inputs.shard else 1,
            seconds=seconds_before + time.monotonic() - started,
        )
        if inputs.shard is None:
            finalize(out_dir, config, part, summary)
        else:
            write_records(out_dir, part)
            info = {**summary, "shard": inputs.shard.index, "config": config.to_dict()}
            storage.write_text(out_dir / SHARD_INFO, json.dumps(info, indent=2) + "\n")
        log_summary(stage_run, out_dir, summary)
    return InstancesResult(out_dir, summary)


def execute(
    config: RunConfig,
    instructions: str | Path | Inputs,
    out_dir: Path,
    *,
    workspace: Path,
    shard: Shard | None = None,
    adapter_uri: str | None = None,
    on_block: Callable[[int, int, Part], None] | None = None,
    force_resume: bool = False,
) -> InstancesResult:
    """Check the inputs and a resume's settings, then load the scorers and the policy and run.

    ``adapter_uri`` is where the adapter is kept for good (a KFP artifact's URI) when
    ``stage3.adapter`` is a local copy; the dataset card names it.
    """
    threads.use_share_of_cores(threads.parallel_shards() if shard is not None else 1)
    inputs = instructions if isinstance(instructions, Inputs) else read_inputs(
        config, instructions, shard
    )  # fmt: skip
    journal.check(
        out_dir, resume_key(config, inputs), force_resume=force_resume, may_change=MAY_CHANGE
    )
    check_adapter(config)
    names = [c.scorer for c in config.stage2.reward.components]
    judge = judge_endpoint(config) if any(n.startswith("llm_judge.") for n in names) else None
    scorers = build_scorers(config.stage2.scorers, names, judge_backend=judge)
    reward = CompositeReward.from_settings(config.stage2.reward, scorers)
    backend = backend_for(config, policy_reference(config))
    return run(
        config,
        inputs,
        out_dir,
        backend,
        reward,
        workspace=workspace,
        adapter_uri=adapter_uri,
        on_block=on_block,
        force_resume=force_resume,
    )
