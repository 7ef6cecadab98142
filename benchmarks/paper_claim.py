"""Does RLAF help? The paper's comparison on the bundled model, end to end (`make experiment`).

REFINE-AF's claim: a model fine-tuned on instances written by the RL-trained policy beats
one fine-tuned on instances written by the base policy on 63–66% of SuperNI tasks. This
runs the whole method at a size that fits about 90 minutes on 2 CPU cores
(``benchmarks/paper_claim.yaml``), each stage through the ``refine-af`` command line:

1. stage 1 bootstraps the instructions;
2. stage 2 trains the policy, keeping a checkpoint every ``stage2.save_steps``;
3. every checkpoint (and the base policy) writes instances for held-out instructions (the
   bundled seed tasks, never an RL prompt) and the composite reward scores them; the
   checkpoint with the best held-out reward is the RL policy (the development signal);
4. stage 3 writes instances for every instruction with each policy;
5. stage 4 fine-tunes one adapter per arm, with identical settings and seeds (the learning
   rate: the one of ``--sft-learning-rates`` with the lowest held-out loss on the base arm);
6. stage 5 scores both on every bundled SuperNI task and compares them per task.

Every step is skipped when its output exists and the stages continue their own journals
and checkpoints, so a rerun continues. All runs nest under one MLflow parent run in
``<work>/mlflow.db``. Writes ``docs/results.md`` and its figures (``--results``) and prints
one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rlaf_cpu import heldout_reward, split_instructions

from refine_af import records, storage, tracking, training
from refine_af.config import RunConfig, load_config
from refine_af.feedback import CompositeReward, build_scorers
from refine_af.records import InstructionRecord

HERE = Path(__file__).resolve().parent
CLI = str(Path(sys.executable).with_name("refine-af"))
HELDOUT_FILE = "heldout.jsonl"
SECONDS_FILE = "seconds.json"  # each step's wall time, across reruns
PEAK_FILE = "peak_rss_gb.json"  # the largest resident set of any invocation's processes
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def log(message: str) -> None:
    print(f"[paper_claim {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Experiment:
    """The work folder of one experiment: each step's output, and the command that makes it."""

    def __init__(self, work: Path, config_path: Path, overrides: list[str]):
        self.work = work
        self.config_path = config_path
        self.overrides = overrides
        self.config: RunConfig = load_config(str(config_path), overrides)
        self.seconds: dict[str, float] = _read_json(work / SECONDS_FILE, {})

    def took(self, name: str, started: float) -> None:
        """Add a finished step's wall time (a step that was killed counts from its last
        start); earlier invocations' steps stay in the file."""
        elapsed = time.monotonic() - started
        self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 1)
        storage.write_text(self.work / SECONDS_FILE, json.dumps(self.seconds, indent=2) + "\n")
        log(f"{name}: {elapsed:.1f} s")

    def peak_rss_gb(self) -> float:
        """The largest resident set of this invocation's processes and of earlier ones."""
        rss = max(resource.getrusage(who).ru_maxrss for who in
                  (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024**2  # fmt: skip
        peak = round(max(rss, _read_json(self.work / PEAK_FILE, 0.0)), 2)
        storage.write_text(self.work / PEAK_FILE, f"{peak}\n")
        return peak

    def refine_af(self, name: str, done: Path, *args: str) -> None:
        """Run one ``refine-af`` command unless ``done`` exists; its progress goes to stderr."""
        if done.exists():
            log(f"{name}: done earlier ({done.relative_to(self.work)})")
            summary = done.parent / "summary.json"
            if name not in self.seconds and summary.is_file():  # its driver was stopped
                self.seconds[name] = json.loads(summary.read_text())["seconds"]
            return
        sets = [a for o in self.overrides for a in ("--set", o)]
        command = [CLI, "stage", *args, "--config", str(self.config_path), *sets,
                   "--workspace", str(self.work)]  # fmt: skip
        log(f"{name}: {' '.join(command[1:])}")
        started = time.monotonic()
        # the stages' tables go to stderr too: stdout ends with the one JSON line
        if subprocess.run(command, stdout=sys.stderr).returncode != 0:
            sys.exit(f"paper_claim: {name} failed; rerun the same command to continue")
        self.took(name, started)

    @property
    def instructions(self) -> Path:
        return self.work / "stage1" / "instructions.jsonl"

    def rl_prompts(self, heldout_ids: set[str]) -> Path:
        """Stage 1's instructions (seeds included, as the pipeline trains on them) minus
        the held-out ones, so that the development signal is measured on unseen prompts."""
        path = self.work / "rl_instructions.jsonl"
        if not path.is_file():
            kept = [r for r in records.read_records(self.instructions, InstructionRecord)
                    if r.id not in heldout_ids]  # fmt: skip
            records.write_jsonl(path, kept)
        return path

    def heldout_curve(self, heldout: list[InstructionRecord]) -> list[dict]:
        """Held-out reward of the base policy and of every checkpoint, appended to a file
        line by line so a rerun scores only what is missing."""
        path = self.work / HELDOUT_FILE
        done = {row["step"]: row for row in records.read_journal(path)}
        checkpoints = sorted(
            (int(p.name.removeprefix("checkpoint-")), p)
            for p in (self.work / "stage2" / "checkpoints").glob("checkpoint-*")
            if (p / ADAPTER_FILES[0]).is_file()
        )
        policies = [(step, str(self.policy_at(step, p))) for step, p in checkpoints]
        wanted = [(0, self.config.model.base), *policies]
        missing = [(s, ref) for s, ref in wanted if s not in done]
        if missing:
            started = time.monotonic()
            names = [c.scorer for c in self.config.stage2.reward.components]
            reward = CompositeReward.from_settings(
                self.config.stage2.reward, build_scorers(self.config.stage2.scorers, names)
            )
            for step, reference in missing:
                mean, floored = heldout_reward(self.config, reference, heldout, reward)
                done[step] = {"step": step, "reward": round(mean, 4), "floored": floored,
                              "completions": len(heldout)}  # fmt: skip
                log(f"held-out reward at step {step}: {mean:.4f} ({floored} floored)")
                records.append_jsonl(path, [done[step]])
            self.took("held-out reward", started)
        return [done[s] for s, _ in wanted]

    def policy_at(self, step: int, checkpoint: Path) -> Path:
        """A checkpoint's adapter as a loadable folder, its config naming the base by its
        reference (trl records this machine's cache path)."""
        folder = self.work / "policies" / f"step-{step}"
        if not (folder / ADAPTER_FILES[1]).is_file():
            staging = folder.with_name(folder.name + ".staging")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(self.work / "stage2" / "adapter", staging)  # the tokenizer files
            for name in ADAPTER_FILES:
                shutil.copy2(checkpoint / name, staging / name)
            training.name_base(staging, self.config.model.base)
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
        return folder


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def pick_policy(curve: list[dict]) -> dict:
    """The checkpoint with the best held-out reward (the earliest among equals); the last
    one when none beats the base policy (step 0), since the experiment compares RL with
    no RL."""
    best = max(curve, key=lambda row: (row["reward"], -row["step"]))
    if best["step"] == 0:
        log("no checkpoint beats the base policy on held-out reward; using the last one")
        return curve[-1]
    return best


def command_line(argv: list[str]) -> str:
    """How to rerun this: ``make experiment`` for its defaults, else the script itself."""
    if argv == ["--work", "experiment"]:
        return "make experiment"
    return " ".join([".venv/bin/python benchmarks/paper_claim.py", *argv])


def parent_run(work: Path) -> str:
    """The MLflow parent run of this work folder: found by its tag, or opened once."""
    os.environ[tracking.PIPELINE_RUN_ENV] = f"paper-claim:{work.resolve()}"
    client = tracking.connect(work)
    found = tracking.pipeline_parent(client)
    return found or tracking.open_pipeline_run(
        work, {"experiment": "paper_claim"}, {"refine_af.experiment": "paper_claim"}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "paper_claim.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a.b=c")
    parser.add_argument("--work", type=Path, default=Path("experiment"),
                        help="work folder; a rerun with the same one continues (other "
                        "settings or --heldout need a new folder)")  # fmt: skip
    parser.add_argument("--heldout", type=int, default=40,
                        help="seed instructions held out for the development signal")  # fmt: skip
    parser.add_argument("--sft-learning-rates", type=float, nargs="+", default=[2e-4, 1e-3],
                        help="stage 4 learning rates tried on the base arm; the one with the "
                        "lowest held-out loss trains both arms")  # fmt: skip
    parser.add_argument("--results", type=Path, default=HERE.parent / "docs" / "results.md",
                        help="the results page to write (its figures go beside it)")  # fmt: skip
    args = parser.parse_args()

    import results_page  # matplotlib and the page, after the arguments are known good

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    exp = Experiment(work, args.config.resolve(), args.overrides)
    run_id = parent_run(work)
    log(f"work folder {work}; MLflow parent run {run_id} in {tracking.tracking_uri(work)}")

    exp.refine_af("stage 1", exp.instructions, "instructions", "--out", str(work / "stage1"))
    _, heldout = split_instructions(args.heldout, exp.config.stage2.seed)
    rl_prompts = exp.rl_prompts({r.id for r in heldout})
    exp.refine_af("stage 2", work / "stage2" / "summary.json", "rlaf",
                  "--instructions", str(rl_prompts), "--out", str(work / "stage2"))  # fmt: skip
    curve = exp.heldout_curve(heldout * 2)  # two samples of each held-out instruction
    best = pick_policy(curve)
    policy = str(work / "policies" / f"step-{best['step']}")
    log(f"RL policy: the checkpoint of step {best['step']} (held-out reward {best['reward']})")

    for arm, adapter in (("rl", ["--adapter", policy]), ("base", [])):
        out = work / f"stage3-{arm}"
        exp.refine_af(f"stage 3 {arm}", out / "summary.json", "instances",
                      "--instructions", str(exp.instructions), *adapter,
                      "--out", str(out))  # fmt: skip

    def sft(arm: str, learning_rate: float) -> Path:
        out = work / f"stage4-{arm}-lr{learning_rate:g}"
        exp.refine_af(f"stage 4 {arm} lr {learning_rate:g}", out / "summary.json", "sft",
                      "--examples", str(work / f"stage3-{arm}" / "examples.jsonl"),
                      "--out", str(out),
                      "--set", f"stage4.learning_rate={learning_rate}")  # fmt: skip
        return out

    # the base arm's held-out loss picks the learning rate both arms then train with
    sweep = {lr: sft("base", lr) for lr in args.sft_learning_rates}
    losses = {
        lr: json.loads((out / "summary.json").read_text())["eval_loss"] for lr, out in sweep.items()
    }
    chosen = min(losses, key=losses.__getitem__)
    log(f"SFT learning rate {chosen:g}: base arm held-out loss {losses}")
    stage4 = {"base": sweep[chosen], "rl": sft("rl", chosen)}
    base_eval = work / "stage5-base" / "candidate" / "evaluation.json"
    exp.refine_af("stage 5 base", base_eval, "evaluate",
                  "--model", str(stage4["base"] / "adapter"),
                  "--out", str(work / "stage5-base"))  # fmt: skip
    exp.refine_af("stage 5 rl", work / "stage5" / "comparison.json", "evaluate",
                  "--model", str(stage4["rl"] / "adapter"), "--baseline", str(base_eval),
                  "--out", str(work / "stage5"))  # fmt: skip

    outcome = results_page.collect(work, curve, best["step"], exp.seconds, stage4, losses)
    line = {
        "bench": "paper_claim",
        "instructions": outcome.instructions,
        "rl_steps": outcome.rl_steps,
        "tasks": outcome.comparison["tasks"],
        "pct_tasks_improved": outcome.comparison["pct_improved"],
        "ci_low": outcome.comparison["ci_low"],
        "ci_high": outcome.comparison["ci_high"],
        "rougeL_rl": outcome.comparison["candidate_rougeL"],
        "rougeL_base": outcome.comparison["baseline_rougeL"],
        "heldout_reward_base": curve[0]["reward"],
        "heldout_reward_rl": best["reward"],
        "seconds": round(sum(exp.seconds.values()), 1),
        "peak_rss_gb": exp.peak_rss_gb(),
        "rl_policy_step": best["step"],
        "sft_learning_rate": chosen,
    }
    results_page.write(args.results, outcome, line, command_line(sys.argv[1:]))
    figures = {k: v for k, v in line.items() if isinstance(v, (int, float))}
    choices = {"refine_af.rl_policy_step": str(best["step"]),
               "refine_af.sft_learning_rate": f"{chosen:g}",
               "refine_af.heldout_instructions": str(args.heldout)}  # fmt: skip
    tracking.log_to_run(work, run_id, figures, choices)
    client = tracking.connect(work)
    for row in curve:
        client.log_metric(run_id, "heldout_reward", row["reward"], step=row["step"])
    client.log_artifact(run_id, str(args.results))
    log(f"results page: {args.results}")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
