"""Fault matrix: concurrent runs, kill -9 mid-stage, tracking and S3 servers lost.

Runs the real ``refine-af`` command line on tiny settings (stage 1 with the scripted
stand-in model of tests/scripted_backend.py, stages 3 and 4 with a tiny random Llama) and
checks, for every case, that the final outputs equal an uninterrupted run's (no record
lost or duplicated), that no process printed a traceback, and how long a process hung: the
longest time it wrote nothing after its server went away (a stage keeps working), or its
time to exit beyond the command line's start-up (a server gone from the start, a run
refused by another's lock). Kill points are drawn with a fixed seed in the work itself: just
after a run keeps a randomly chosen next unit of work (stage 1's rounds, stage 3's blocks,
stage 4's checkpoints), plus up to one unit's time; the work kept after each kill is printed.

    python benchmarks/faults.py [--kills 10] [--seed 0]

The last line is the JSON summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CLI = str(Path(sys.executable).with_name("refine-af"))
SCRIPTED = str(ROOT / "tests" / "scripted_backend.py")
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # this tree's code, also when another checkout is installed in the environment
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
}
for name in (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
):
    ENV.pop(name, None)


class Tally:
    def __init__(self) -> None:
        self.cases = 0
        self.lost = 0
        self.duplicated = 0
        self.tracebacks = 0
        self.max_hang_s = 0.0
        self.failures: list[str] = []

    def process(self, stderr: str) -> None:
        self.tracebacks += stderr.count("Traceback (most recent call last)")

    def compare(self, case: str, reference: list[str], final: list[str]) -> None:
        """Records are compared as lines: lost = reference lines missing, duplicated = extra."""
        self.cases += 1
        ref, got = Counter(reference), Counter(final)
        lost = sum((ref - got).values())
        duplicated = sum((got - ref).values())
        self.lost += lost
        self.duplicated += duplicated
        if lost or duplicated:
            self.failures.append(f"{case}: lost {lost}, duplicated {duplicated}")

    def hang(self, case: str, seconds: float, code: int, expected: int) -> None:
        print(f"{case}: hung {seconds:.1f} s, exit {code} (expected {expected})", flush=True)
        self.cases += 1
        self.max_hang_s = max(self.max_hang_s, seconds)
        if code != expected:
            self.failures.append(f"{case}: exit {code}, expected {expected}")


def run(command: list[str], env: dict | None = None, timeout: float = 600):
    started = time.monotonic()
    done = subprocess.run(command, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr, time.monotonic() - started


def footprint(folder: Path) -> list[tuple[str, int, int]] | None:
    """What a run has written so far: every file's name, size and mtime."""
    try:
        return sorted(
            (str(path), stat.st_size, stat.st_mtime_ns)
            for path in folder.rglob("*")
            if path.is_file() and (stat := path.stat())
        )
    except OSError:  # a file went away while it was listed: that is a change too
        return None


@dataclass
class Watched:
    """How a watched process ended, and when its output folder changed (seconds from start)."""

    code: int
    stderr: str
    seconds: float
    changes: list[float] = field(default_factory=list)
    units: list[tuple[float, int]] = field(default_factory=list)  # (when, work kept)

    def longest_gap(self, since: float = 0.0) -> float:
        """The longest time after ``since`` in which the process wrote nothing, until it exited:
        how long it hung, as opposed to how long it worked."""
        marks = [since, *(t for t in self.changes if t > since), self.seconds]
        return max(b - a for a, b in itertools.pairwise(marks))


def watched(
    command: list[str], out: Path, *, env: dict | None = None,
    kill_at: tuple[int, float] | None = None,
    units=None, on_tick=None, timeout: float = 600,
) -> Watched:  # fmt: skip
    """Run ``command`` to its end, watching ``out``: ``units(out)`` counts the work kept so far
    (journal entries, checkpoints), ``on_tick(seconds)`` runs on every poll, and with
    ``kill_at=(units, seconds)`` the process is SIGKILLed that many seconds after it has kept
    that much work. stderr goes to a file, so a full pipe cannot stall the process."""
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, env=env or ENV, stdout=subprocess.DEVNULL, stderr=err)
        started = time.monotonic()
        result = Watched(0, "", 0.0)
        last, done = footprint(out), units(out) if units else 0
        reached = 0.0 if kill_at and done >= kill_at[0] else None
        while process.poll() is None:
            now = time.monotonic() - started
            if (reached is not None and now >= reached + kill_at[1]) or now >= timeout:
                process.send_signal(signal.SIGKILL)
                process.wait()
                break
            if on_tick is not None:
                on_tick(now)
            time.sleep(0.05)
            if (current := footprint(out)) != last:
                result.changes.append(time.monotonic() - started)
                last = current
                if units and (count := units(out)) > done:
                    result.units.append((time.monotonic() - started, count))
                    done = count
                    if kill_at and reached is None and done >= kill_at[0]:
                        reached = time.monotonic() - started
        result.code, result.seconds = process.returncode, time.monotonic() - started
        err.seek(0)
        result.stderr = err.read().decode(errors="replace")
    return result


def journal_units(event: str):
    """Counts the finished rounds (stage 1) or blocks (stage 3) in a folder's journal."""
    marker = f'"event": "{event}"'.encode()

    def count(out: Path) -> int:
        path = out / "journal.jsonl"
        complete = path.read_bytes().split(b"\n")[:-1] if path.is_file() else []
        return sum(marker in line for line in complete)

    return count


def checkpoint_units(out: Path) -> int:
    """Stage 4: the step of its newest complete checkpoint (the trainer state is written last)."""
    steps = [
        int(p.parent.name.removeprefix("checkpoint-"))
        for p in (out / "checkpoints").glob("checkpoint-*/trainer_state.json")
    ]
    return max(steps, default=0)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1] if path.is_file() else []


def kill_point(reference: Watched, kept: int, rng: random.Random) -> tuple[int, float]:
    """Where to kill the next run: once it has kept one of the next units of work (drawn
    from the nearest third of what is left in the reference run), plus up to one unit's
    time; so kills land in the work, whatever the load does to start-up times."""
    times, counts = zip(*reference.units, strict=True)
    unit_s = (times[-1] - times[0]) / max(len(times) - 1, 1)
    ahead = [count for count in counts if count > kept]
    target = rng.choice(ahead[: max(1, len(ahead) // 3)]) if ahead else kept
    return target, rng.uniform(0.0, unit_s)


def kill_chain(
    name: str, command: list[str], out: Path, files: list[str], reference: dict, kills: int,
    ref: Watched, rng: random.Random, tally: Tally, units,
) -> list[int]:  # fmt: skip
    """Kill ``command`` ``kills`` times at random points of its work (``kill_point``), then
    let it finish; returns the work kept after each kill."""
    kept = []
    for _ in range(kills):
        point = kill_point(ref, units(out), rng)
        tally.process(watched(command, out, kill_at=point, units=units).stderr)
        kept.append(units(out))
    code, stderr, _ = run(command)
    tally.process(stderr)
    if code != 0:
        tally.failures.append(f"{name}: final run exit {code}: {stderr.strip()[-300:]}")
    for file in files:
        tally.compare(f"{name} {file}", reference[file], lines(out / file))
    print(f"{name}: work kept after each kill {kept}", flush=True)
    if not any(k > 0 for k in kept):
        tally.failures.append(f"{name}: no kill landed after some work was kept")
    return kept


def tiny_llama(target: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from refine_af import models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="kill -9 points per stage")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    rng = random.Random(options.seed)
    tally = Tally()
    root = Path(tempfile.mkdtemp(prefix="faults-"))
    started = time.monotonic()
    try:
        # ------------------------------------------------ stage 1: reference, kills, races
        ws = root / "ws"
        # 4 instructions a round: 15 rounds to kill in (local-cpu's 16 prompts make it 2)
        stage1 = lambda out, target="60": [  # noqa: E731
            SCRIPTED, str(out), str(ws), target, "--set", "stage1.prompts_per_round=2",
        ]  # fmt: skip
        rounds = journal_units("round")
        # the first run creates the MLflow store, which later runs find: not the reference
        assert run([sys.executable, *stage1(root / "s1-warm-up")])[0] == 0
        ref = watched([sys.executable, *stage1(root / "s1-ref")], root / "s1-ref", units=rounds)
        assert ref.code == 0, ref.stderr
        files1 = ["instructions.jsonl", "filtered.jsonl", "quarantine.jsonl"]
        ref1 = {f: lines(root / "s1-ref" / f) for f in files1}
        print(f"stage 1 reference: {ref.seconds:.1f} s, {ref.units[-1][1]} rounds", flush=True)
        kill_chain(
            "stage 1 kill -9", [sys.executable, *stage1(root / "s1-kill")], root / "s1-kill",
            files1, ref1, options.kills, ref, rng, tally, rounds,
        )  # fmt: skip
        print(f"stage 1: {options.kills} kills done", flush=True)
        for attempt in range(3):  # two runs at once on one folder
            out = root / f"s1-race{attempt}"
            command = [sys.executable, *stage1(out)]
            with ThreadPoolExecutor(2) as pool:
                both = list(pool.map(watched, [command, command], [out, out]))
            for one in both:
                tally.process(one.stderr)
            codes = sorted(one.code for one in both)
            # the loser exits 2 once it finds the lock taken: its hang is from when the winner
            # took it (its first write; both started together) to its exit. Or it started after
            # the winner had finished and found the target met: then nobody waited.
            winner = min(both, key=lambda one: one.changes[0] if one.changes else math.inf)
            taken = winner.changes[0] if winner.changes else 0.0
            refused = [max(one.seconds - taken, 0.0) for one in both if one.code == 2]
            tally.hang(f"race {attempt}", max(refused, default=0.0), 0 if codes in
                       ([0, 2], [0, 0]) else sum(codes), 0)  # fmt: skip
            for file in files1:
                tally.compare(f"race {attempt} {file}", ref1[file], lines(out / file))
        print("stage 1: races done", flush=True)

        # ------------------------------------------------ MLflow and S3 lost
        from conftest import _stop_group, start_mlflow_server

        server_root = root / "mlflow"
        server_root.mkdir()
        url, server = start_mlflow_server(server_root)
        out = root / "s1-mlflow"
        env = {**ENV, "MLFLOW_TRACKING_URI": url}
        journal_at: list[float] = []
        lost_at: list[float] = []

        def kill_server(now: float) -> None:
            """Kill the tracking server 2 s after the stage started its journal."""
            if not journal_at and (out / "journal.jsonl").is_file():
                journal_at.append(now)
            if journal_at and not lost_at and now - journal_at[0] > 2:
                server.send_signal(signal.SIGKILL)
                _stop_group(server)
                lost_at.append(now)

        lost = watched([sys.executable, *stage1(out, "150")], out, env=env, on_tick=kill_server)
        tally.process(lost.stderr)
        assert lost_at, "the stage ended before the server could be killed"
        # the stage keeps working (its outputs complete), so the hang is the longest time
        # it wrote nothing after the server went away
        tally.hang("mlflow killed mid-stage", lost.longest_gap(lost_at[0]), lost.code, 1)
        _, _, _ = run([sys.executable, *stage1(root / "s1-ref150", "150")])
        for file in files1:
            tally.compare(
                f"mlflow killed {file}", lines(root / "s1-ref150" / file), lines(out / file)
            )

        # a server that is gone is met after the command line has started (imports, config,
        # inputs): that time is measured on bad input (exit 2) and is not hanging
        missing = ["--seed-tasks", str(root / "missing.jsonl")]
        code, _, startup = run([CLI, "stage", "instructions", "-o", str(root / "none"), *missing])
        assert code == 2
        print(f"command-line start-up to an input error: {startup:.1f} s", flush=True)
        with socket.socket() as hole:
            hole.bind(("127.0.0.1", 0))
            hole.listen(64)
            silent = f"http://127.0.0.1:{hole.getsockname()[1]}"
            closed = f"http://127.0.0.1:{free_port()}"
            for what, endpoint in (("black-holed", silent), ("refused", closed)):
                env = {**ENV, "MLFLOW_TRACKING_URI": endpoint}
                command = [CLI, "stage", "instructions", "-o", str(root / f"mlflow-{what}")]
                code, stderr, seconds = run(command, env=env)
                tally.process(stderr)
                tally.hang(f"mlflow {what}", max(seconds - startup, 0.0), code, 1)
                s3 = {
                    **ENV, "S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x",
                    "AWS_SECRET_ACCESS_KEY": "x",
                }  # fmt: skip
                command = [
                    CLI, "stage", "instructions", "-o", str(root / f"s3-{what}"),
                    "--workspace", str(ws), "--seed-tasks", "s3://bucket/seeds.jsonl",
                ]  # fmt: skip
                code, stderr, seconds = run(command, env=s3)
                tally.process(stderr)
                tally.hang(f"s3 {what}", max(seconds - startup, 0.0), code, 1)
        print("servers lost: done", flush=True)

        # ------------------------------------------------ stage 3 and 4 on a tiny Llama
        model = tiny_llama(root / "tiny-llama")
        instructions = root / "s1-ref" / "instructions.jsonl"
        sets3 = [
            f"model.base={model}", f"stage2.scorers.llm_judge.model={model}",
            "stage3.samples_per_instruction=2", "stage3.max_new_tokens=16",
            "generation.batch_size=4",
        ]  # fmt: skip
        stage3 = lambda out: [  # noqa: E731
            CLI, "stage", "instances", "-i", str(instructions), "-o", str(out),
            "--workspace", str(ws), *[a for s in sets3 for a in ("--set", s)],
        ]  # fmt: skip
        blocks = journal_units("block")
        ref = watched(stage3(root / "s3-ref"), root / "s3-ref", units=blocks)
        assert ref.code == 0, ref.stderr
        files3 = ["examples.jsonl", "filtered.jsonl", "quarantine.jsonl"]
        ref3 = {f: lines(root / "s3-ref" / f) for f in files3}
        print(f"stage 3 reference: {ref.seconds:.1f} s, {ref.units[-1][1]} blocks", flush=True)
        kill_chain(
            "stage 3 kill -9", stage3(root / "s3-kill"), root / "s3-kill", files3, ref3,
            options.kills, ref, rng, tally, blocks,
        )  # fmt: skip
        print(f"stage 3: {options.kills} kills done", flush=True)

        examples = root / "examples.jsonl"
        examples.write_text(
            "".join(
                json.dumps({
                    "id": f"e{i}", "instruction_id": f"i{i % 10}", "instruction": f"Task {i % 10}.",
                    "input": f"input {i}", "output": f"output {i}", "policy": "base",
                }) + "\n"
                for i in range(40)
            )
        )  # fmt: skip
        sets4 = [
            f"model.base={model}", "stage4.max_steps=40", "stage4.save_steps=4",
            "stage4.per_device_batch_size=2", "stage4.max_length=64",
            "stage4.register_model=false", "stage4.eval_fraction=0.1",
        ]  # fmt: skip
        stage4 = lambda out: [  # noqa: E731
            CLI, "stage", "sft", "-e", str(examples), "-o", str(out), "--workspace", str(ws),
            *[a for s in sets4 for a in ("--set", s)],
        ]  # fmt: skip
        ref = watched(stage4(root / "s4-ref"), root / "s4-ref", units=checkpoint_units)
        assert ref.code == 0, ref.stderr
        print(f"stage 4 reference: {ref.seconds:.1f} s, checkpoints {ref.units}", flush=True)
        out = root / "s4-kill"
        kept = []
        for _ in range(options.kills):
            point = kill_point(ref, checkpoint_units(out), rng)
            watch = watched(stage4(out), out, kill_at=point, units=checkpoint_units)
            tally.process(watch.stderr)
            kept.append(checkpoint_units(out))
        print(f"stage 4 kill -9: checkpoint kept after each kill {kept}", flush=True)
        if not any(kept):
            tally.failures.append("stage 4 kill -9: no kill landed after a checkpoint")
        code, stderr, _ = run(stage4(out))
        tally.process(stderr)
        summary = json.loads((out / "summary.json").read_text()) if code == 0 else {}
        steps = summary.get("steps", 0)
        # a "record" of stage 4 is a training step: none lost, none run twice past the end
        tally.compare("stage 4 kill -9 steps", [str(s) for s in range(40)],
                      [str(s) for s in range(steps)])  # fmt: skip
        if code != 0 or not (out / "adapter" / "adapter_config.json").is_file():
            tally.failures.append(f"stage 4: final run exit {code}: {stderr.strip()[-300:]}")
        print(f"stage 4: {options.kills} kills done (resumed from "
              f"{summary.get('resumed_from_checkpoint')})", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for failure in tally.failures:
        print(f"FAILED {failure}", flush=True)
    print(f"total {time.monotonic() - started:.0f} s", flush=True)
    print(
        json.dumps(
            {
                "bench": "faults",
                "cases": tally.cases,
                "kills_per_stage": options.kills,
                "lost_records": tally.lost,
                "duplicated_records": tally.duplicated,
                "tracebacks": tally.tracebacks,
                "max_hang_s": round(tally.max_hang_s, 1),
                "failed_cases": len(tally.failures),
            }
        )
    )


if __name__ == "__main__":
    main()
