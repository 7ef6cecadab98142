"""Fault matrix: concurrent runs, kill -9 mid-stage, tracking and S3 servers lost.

Runs the real ``refine-af`` command line on tiny settings (stage 1 with the scripted
stand-in model of tests/scripted_backend.py, stages 3 and 4 with a tiny random Llama) and
checks, for every case, that the final outputs equal an uninterrupted run's (no record
lost or duplicated), that no process printed a traceback, and how long a process took to
exit after its server went away. Kill points are drawn with a fixed seed.

    python benchmarks/faults.py [--kills 10] [--seed 0]

The last line is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
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
        self.cases += 1
        self.max_hang_s = max(self.max_hang_s, seconds)
        if code != expected:
            self.failures.append(f"{case}: exit {code}, expected {expected}")


def run(command: list[str], env: dict | None = None, timeout: float = 600):
    started = time.monotonic()
    done = subprocess.run(command, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr, time.monotonic() - started


def killed_at(command: list[str], delay: float, tally: Tally) -> None:
    """Start ``command`` and SIGKILL it after ``delay`` seconds (if still running)."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
    tally.process(process.stderr.read().decode(errors="replace"))


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1] if path.is_file() else []


def kill_chain(
    name: str, command: list[str], out: Path, files: list[str], reference: dict, kills: int,
    span: tuple[float, float], rng: random.Random, tally: Tally,
) -> None:  # fmt: skip
    """Kill ``command`` ``kills`` times at random points of ``span``, then let it finish."""
    for _ in range(kills):
        killed_at(command, rng.uniform(*span), tally)
    code, stderr, _ = run(command)
    tally.process(stderr)
    if code != 0:
        tally.failures.append(f"{name}: final run exit {code}: {stderr.strip()[-300:]}")
    for file in files:
        tally.compare(f"{name} {file}", reference[file], lines(out / file))


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
        stage1 = lambda out, target="60": [SCRIPTED, str(out), str(ws), target]  # noqa: E731
        code, stderr, seconds1 = run([sys.executable, *stage1(root / "s1-ref")])
        assert code == 0, stderr
        files1 = ["instructions.jsonl", "filtered.jsonl", "quarantine.jsonl"]
        ref1 = {f: lines(root / "s1-ref" / f) for f in files1}
        print(f"stage 1 reference: {seconds1:.1f} s", flush=True)
        kill_chain(
            "stage 1 kill -9", [sys.executable, *stage1(root / "s1-kill")], root / "s1-kill",
            files1, ref1, options.kills, (seconds1 * 0.3, seconds1 * 0.95), rng, tally,
        )  # fmt: skip
        print(f"stage 1: {options.kills} kills done", flush=True)
        for attempt in range(3):  # two runs at once on one folder
            out = root / f"s1-race{attempt}"
            runs = [
                subprocess.Popen([sys.executable, *stage1(out)], env=ENV, text=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for _ in range(2)
            ]  # fmt: skip
            begun = time.monotonic()
            codes = []
            for process in runs:
                codes.append(process.wait(timeout=600))
                tally.process(process.stderr.read())
            loser = min(time.monotonic() - begun, 600)
            if sorted(codes) == [0, 2]:
                tally.hang(f"race {attempt}", 0.0, 0, 0)
            else:
                tally.hang(f"race {attempt}", loser, codes[0] + codes[1], 2)
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
        process = subprocess.Popen(
            [sys.executable, *stage1(out, "150")], env=env, text=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        while not (out / "journal.jsonl").exists() and process.poll() is None:
            time.sleep(0.1)
        time.sleep(2)
        server.send_signal(signal.SIGKILL)
        _stop_group(server)
        lost_at = time.monotonic()
        code = process.wait(timeout=600)
        stderr = process.stderr.read()
        tally.process(stderr)
        tally.hang("mlflow killed mid-stage", time.monotonic() - lost_at, code, 1)
        _, _, _ = run([sys.executable, *stage1(root / "s1-ref150", "150")])
        for file in files1:
            tally.compare(
                f"mlflow killed {file}", lines(root / "s1-ref150" / file), lines(out / file)
            )

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
                tally.hang(f"mlflow {what}", seconds, code, 1)
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
                tally.hang(f"s3 {what}", seconds, code, 1)
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
        code, stderr, seconds3 = run(stage3(root / "s3-ref"))
        assert code == 0, stderr
        files3 = ["examples.jsonl", "filtered.jsonl", "quarantine.jsonl"]
        ref3 = {f: lines(root / "s3-ref" / f) for f in files3}
        print(f"stage 3 reference: {seconds3:.1f} s", flush=True)
        kill_chain(
            "stage 3 kill -9", stage3(root / "s3-kill"), root / "s3-kill", files3, ref3,
            options.kills, (seconds3 * 0.3, seconds3 * 0.95), rng, tally,
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
        code, stderr, seconds4 = run(stage4(root / "s4-ref"))
        assert code == 0, stderr
        print(f"stage 4 reference: {seconds4:.1f} s", flush=True)
        out = root / "s4-kill"
        for _ in range(options.kills):
            killed_at(stage4(out), rng.uniform(seconds4 * 0.4, seconds4 * 0.95), tally)
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
