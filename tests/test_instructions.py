"""Stage 1: Self-Instruct parsing, filters, the bootstrap loop, resume, tracking, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scripted_backend import ScriptedBackend

from refine_af import records
from refine_af.config import InstructionsSettings, load_config
from refine_af.errors import InputError
from refine_af.generation import Completion
from refine_af.records import InstructionRecord
from refine_af.self_instruct import encode_prompt, parse_continuation, rule_violation
from refine_af.stages import instructions
from refine_af.textsim import rouge_l_f

SETTINGS = InstructionsSettings()
CLI = str(Path(sys.executable).with_name("refine-af"))


def config_for(target: int, *extra: str):
    return load_config("local-cpu", [f"stage1.num_instructions={target}", *extra])


def test_prompt_is_a_numbered_list_the_model_continues():
    prompt = encode_prompt(["Sort the list:", "Name  a\ncolour."])
    assert prompt == "Come up with a series of tasks:\n1. Sort the list\n2. Name a colour.\n3."


def test_parse_splits_items_and_normalises_case_and_space():
    completion = Completion(" write A  poem\nabout cats.\n10. Name three rivers", "stop", 9)
    assert parse_continuation(completion) == (
        ["Write a poem about cats.", "Name three rivers"],
        None,
    )


def test_parse_sets_aside_the_item_cut_by_the_token_limit():
    completion = Completion(" Name three rivers\n10. Describe the history of", "length", 64)
    assert parse_continuation(completion) == (["Name three rivers"], "Describe the history of")


def test_paper_presets_drop_a_continuation_cut_by_the_token_limit_as_self_instruct():
    completion = Completion(" Name three rivers\n10. Describe the history of", "length", 64)
    on_limit = load_config("paper-mistral-7b").stage1.on_token_limit
    assert on_limit == "drop_response"
    assert parse_continuation(completion, on_limit) == ([], completion.text)
    finished = Completion(" Name three rivers\n10. Name a colour", "stop", 9)
    assert parse_continuation(finished, on_limit)[0] == ["Name three rivers", "Name a colour"]


@pytest.mark.parametrize(
    ("candidate", "reason"),
    [
        ("Name three rivers", "too_short"),
        (" ".join(["word"] * 151), "too_long"),
        ("Describe the image in one sentence", "blocked_word"),
        ("Tell me how to go to the station", "blocked_word"),
        ("Open the FILES and summarise them", "blocked_word"),
        ("Write a program that sorts numbers", "blocked_prefix"),
        ('"Quote" the following sentence back', "starts_with_punctuation"),
        ("Ñame the capital of Spain please", "starts_non_ascii"),
        ("Name three rivers in Europe", None),
        ("Describe the imagery in this poem", None),  # whole words only
    ],
)
def test_rules_as_self_instruct(candidate, reason):
    assert rule_violation(candidate, SETTINGS) == reason


def test_bootstrap_reaches_target_and_counts_reconcile(tmp_path):
    result = instructions.run(
        config_for(12), tmp_path / "out", ScriptedBackend(), workspace=tmp_path / "ws"
    )
    summary = result.summary
    assert summary["accepted"] == 12 and summary["reached_target"]
    filtered = sum(summary["filtered"].values())
    truncated = summary["quarantined"].get("truncated", 0)
    assert summary["candidates"] == summary["accepted"] + filtered + truncated
    assert summary["filtered"]["too_short"] > 0 and summary["filtered"]["too_similar"] > 0

    pool = records.read_records(tmp_path / "out" / "instructions.jsonl", InstructionRecord)
    machine = [r for r in pool if r.source == "machine"]
    assert len(pool) == 175 + 12 and len(machine) == 12
    assert len({r.instruction for r in pool}) == len(pool)
    filtered_rows = [json.loads(x) for x in (tmp_path / "out" / "filtered.jsonl").open()]
    assert len(filtered_rows) == filtered and all(row["reason"] for row in filtered_rows)


def test_accepted_records_carry_exact_neighbours_and_classification(tmp_path):
    config = config_for(6, "stage1.record_avg_similarity=true")
    instructions.run(config, tmp_path / "out", ScriptedBackend(), workspace=tmp_path / "ws")
    pool = records.read_records(tmp_path / "out" / "instructions.jsonl", InstructionRecord)
    earlier = [r.instruction for r in pool if r.source == "seed"]
    for record in (r for r in pool if r.source == "machine"):
        scores = [rouge_l_f(record.instruction, other) for other in earlier]
        assert max(scores) <= 0.7
        assert len(record.most_similar) == 10
        assert max(record.most_similar.values()) == max(scores)
        assert record.avg_similarity_score == pytest.approx(sum(scores) / len(scores), abs=1e-12)
        assert record.is_classification == ("alpha" in record.instruction)
        earlier.append(record.instruction)


def test_no_similar_pair_among_accepted(tmp_path):
    instructions.run(config_for(20), tmp_path / "out", ScriptedBackend(), workspace=tmp_path / "ws")
    pool = records.read_records(tmp_path / "out" / "instructions.jsonl", InstructionRecord)
    machine = [r.instruction for r in pool if r.source == "machine"]
    for i, text in enumerate(machine):
        assert all(rouge_l_f(text, other) <= 0.7 for other in machine[:i])


class Interrupted(Exception):
    pass


class DiesAfter(ScriptedBackend):
    def __init__(self, rounds: int) -> None:
        super().__init__()
        self.rounds = rounds

    def generate(self, prompts, params, *, chat=False):
        if self.calls == self.rounds:
            raise Interrupted
        return super().generate(prompts, params, chat=chat)


def test_rerun_continues_where_an_interrupted_run_stopped(tmp_path):
    out, ws = tmp_path / "out", tmp_path / "ws"
    config = config_for(40, "stage1.prompts_per_round=4")
    with pytest.raises(Interrupted):
        instructions.run(config, out, DiesAfter(rounds=2), workspace=ws)
    assert not (out / "instructions.jsonl").exists()
    partial = [e for e in records.read_journal(out / "journal.jsonl") if e["event"] == "accepted"]
    assert 0 < len(partial) < 40

    result = instructions.run(config, out, ScriptedBackend(), workspace=ws)
    pool = records.read_records(out / "instructions.jsonl", InstructionRecord)
    machine = [r for r in pool if r.source == "machine"]
    assert result.summary["accepted"] == len(machine) == 40
    assert [r.instruction for r in machine[: len(partial)]] == [
        e["record"]["instruction"] for e in partial
    ]
    assert len({r.instruction for r in machine}) == 40
    assert len({r.id for r in machine}) == 40


def test_a_killed_process_resumes_without_duplicates(tmp_path):
    out, ws = tmp_path / "out", tmp_path / "ws"
    script = Path(__file__).with_name("scripted_backend.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, str(script), str(out), str(ws), "60"]
    process = subprocess.Popen(command, env=env)
    journal = out / "journal.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rounds = [e for e in records.read_journal(journal) if e["event"] == "round"]
        if len(rounds) >= 1:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists()

    subprocess.run(command, env=env, check=True)
    summary = json.loads((out / "summary.json").read_text())
    pool = records.read_records(out / "instructions.jsonl", InstructionRecord)
    machine = [r.instruction for r in pool if r.source == "machine"]
    assert summary["accepted"] == len(machine) == len(set(machine)) == 60


def test_torn_journal_line_is_cut_and_the_run_continues(tmp_path):
    journal = tmp_path / "journal.jsonl"
    records.append_jsonl(journal, [{"event": "round", "round": 1}])
    with journal.open("a") as handle:
        handle.write('{"event": "acc')
    assert records.read_journal(journal) == [{"event": "round", "round": 1}]
    records.append_jsonl(journal, [{"event": "round", "round": 2}])
    assert [e["round"] for e in records.read_journal(journal)] == [1, 2]


def test_resume_with_different_settings_is_refused(tmp_path):
    out, ws = tmp_path / "out", tmp_path / "ws"
    instructions.run(config_for(3), out, ScriptedBackend(), workspace=ws)
    with pytest.raises(InputError, match="different settings"):
        changed = config_for(3, "stage1.similarity_threshold=0.5")
        instructions.run(changed, out, ScriptedBackend(), workspace=ws)


@pytest.mark.integration
def test_stage_metrics_reach_a_real_mlflow_server(tmp_path, mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "stage1-test")
    result = instructions.run(
        config_for(5), tmp_path / "out", ScriptedBackend(), workspace=tmp_path / "ws"
    )
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("stage1-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["accepted"] == 5
    assert run.data.metrics["candidates"] == result.summary["candidates"]
    assert run.data.params["stage1.num_instructions"] == "5"
    assert run.data.tags["refine_af.config_hash"] == result.summary["config_hash"]
    history = client.get_metric_history(run.info.run_id, "progress.accepted")
    assert [m.step for m in history] == list(range(1, result.summary["rounds"] + 1))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "sample_instructions.txt"} <= artifacts


# ------------------------------------------------------------------- bad input via the CLI


def seeds_file(tmp_path, lines):
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD_SEED = json.dumps(
    {
        "id": "s1",
        "name": "n",
        "instruction": "Name a colour.",
        "instances": [{"input": "", "output": "Red"}],
        "is_classification": False,
    }
)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda p: ["--seed-tasks", str(p / "missing.jsonl")], "missing.jsonl: file not found"),
        (lambda p: ["--seed-tasks", str(seeds_file(p, [GOOD_SEED, "{not json"]))], ":2: not valid"),
        (
            lambda p: ["--seed-tasks", str(seeds_file(p, [GOOD_SEED.replace("instruction", "x")]))],
            ":1: field 'instruction'",
        ),
        (lambda p: ["--set", "stage1.num_instructionz=3"], "unknown config key stage1.num_ins"),
        (lambda p: ["--config", "no-such-preset"], "unknown preset"),
    ],
)
def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(tmp_path, make_args, message):
    args = make_args(tmp_path)
    out = tmp_path / "out"
    command = [CLI, "stage", "instructions", "--out", str(out), "--workspace", str(tmp_path)]

    process = subprocess.run([*command, *args], capture_output=True, text=True)
    assert process.returncode == 2, process.stderr
    assert message in " ".join(process.stderr.split())
    assert not out.exists()
