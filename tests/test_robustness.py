"""Nothing lost, nothing hangs: locks, bounded waits, exit codes, JSONL that reads back.

Each test names the item of issue 13 it covers.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from cli_runner import cli_output
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted_backend import ScriptedBackend

from refine_af import cli, journal, locking, records, storage, tracking, training
from refine_af.config import load_config
from refine_af.errors import InputError, TrackingUnavailable
from refine_af.records import ExampleRecord, InstructionRecord, SeedInstance, SeedTask
from refine_af.stages import instances, instructions


def seed(i: int, **changes) -> dict:
    row = {
        "id": f"s{i}",
        "name": f"n{i}",
        "instruction": f"Name a colour number {i} of the rainbow.",
        "instances": [{"input": "", "output": "Red"}],
        "is_classification": i % 2 == 0,
    }
    return {**row, **changes}


def seeds_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def instructions_cli(monkeypatch, capsys, tmp_path, *args):
    out = tmp_path / "out"
    command = ["stage", "instructions", "--out", str(out), "--workspace", str(tmp_path / "ws")]
    return (*cli_output(monkeypatch, capsys, *command, *args), out)


# ------------------------------------------------------------ 1. one run per output folder


def _hold_lock_in_child(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from refine_af import locking\n"
        "with locking.output_lock(sys.argv[1]):\n"
        "    print('held', flush=True); time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"held"
    return child


def test_1_second_run_on_a_locked_folder_exits_2_naming_the_holder(tmp_path, monkeypatch, capsys):
    child = _hold_lock_in_child(tmp_path / "out")
    try:
        code, _, err, out = instructions_cli(monkeypatch, capsys, tmp_path)
    finally:
        child.kill()
        child.wait()
    assert code == 2, err
    assert "another run is writing this output folder" in err
    assert f"pid {child.pid}" in err
    assert not (out / instructions.JOURNAL).exists()


def test_1_lock_of_a_killed_run_is_taken_over(tmp_path):
    child = _hold_lock_in_child(tmp_path / "out")
    child.send_signal(signal.SIGKILL)
    child.wait()
    heard = []
    with locking.output_lock(tmp_path / "out", warn=heard.append):
        holder = json.loads((tmp_path / "out" / locking.HOLDER_FILE).read_text())
        assert holder["pid"] == os.getpid()
    assert len(heard) == 1 and f"pid {child.pid}" in heard[0]
    assert not (tmp_path / "out" / locking.HOLDER_FILE).exists()


def test_1_two_processes_racing_on_one_folder_lose_and_duplicate_nothing(tmp_path):
    """Two stage 1 runs started together on one folder: while one holds it the other exits 2
    (or, when the first finished before the second took the lock, the second finds the target
    met and writes nothing); either way the result has every id once."""
    out, ws = tmp_path / "out", tmp_path / "ws"
    script = Path(__file__).with_name("scripted_backend.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, str(script), str(out), str(ws), "20"]
    runs = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE) for _ in range(2)]
    codes = sorted(run.wait(timeout=300) for run in runs)
    assert codes in ([0, 2], [0, 0]), [run.stderr.read() for run in runs]
    pool = records.read_records(out / "instructions.jsonl", InstructionRecord)
    machine = [r for r in pool if r.source == "machine"]
    assert len(machine) == len({r.id for r in machine}) == 20
    accepted = [e for e in records.read_journal(out / "journal.jsonl") if e["event"] == "accepted"]
    assert len(accepted) == 20


# ------------------------------------------------------------ 2. too few seeds for the prompt


def test_2_fewer_seeds_than_prompt_instructions_exit_2_before_any_model_loads(
    tmp_path, monkeypatch, capsys
):
    path = seeds_file(tmp_path / "seeds.jsonl", [seed(i) for i in range(5)])
    code, _, err, out = instructions_cli(monkeypatch, capsys, tmp_path, "--seed-tasks", str(path))
    assert code == 2
    assert "5 seed tasks" in err and "stage1.prompt_instructions=8" in err
    assert not out.exists()
    assert "instructions" not in err.split("error")[0]  # no progress bar before the error


# ------------------------------------------------------------ 3. tracking lost mid-stage


class KillsServerAfterFirstRound(ScriptedBackend):
    def __init__(self, stop) -> None:
        super().__init__()
        self.stop = stop

    def generate(self, prompts, params, *, chat=False):
        if self.calls == 1:
            self.stop()
        return super().generate(prompts, params, chat=chat)


@pytest.mark.integration
def test_3_lost_server_mid_stage_is_bounded_outputs_complete_then_it_fails(
    tmp_path, doomed_mlflow_server, monkeypatch
):
    url, stop = doomed_mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    for name in tracking.WAIT_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    config = load_config("local-cpu", ["stage1.num_instructions=12", "stage1.prompts_per_round=2"])
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=url):
        instructions.run(
            config, tmp_path / "out", KillsServerAfterFirstRound(stop), workspace=tmp_path
        )
    assert time.monotonic() - started < 60
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["accepted"] == 12


@pytest.mark.integration
def test_3_black_holed_server_fails_in_bounded_time(tmp_path, black_hole, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", black_hole)
    started = time.monotonic()
    code, _, err, out = instructions_cli(monkeypatch, capsys, tmp_path)
    assert code == 1 and black_hole in err
    assert time.monotonic() - started < 30
    assert not out.exists()  # 12: checked before any model loads or journal is written


def test_3_runs_left_running_by_a_killed_stage_are_marked_killed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with tracking.stage_run("instructions", tmp_path, out_dir=out) as first:
        pass
    client = tracking.connect(tmp_path)
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    abandoned = client.create_run(
        experiment.experiment_id,
        tags={tracking.STAGE_TAG: "instructions", tracking.OUT_DIR_TAG: str(out.resolve())},
    )  # what a kill -9 leaves: a run nobody ended
    other = client.create_run(experiment.experiment_id, tags={tracking.STAGE_TAG: "instructions"})
    with tracking.stage_run("instructions", tmp_path, out_dir=out):
        pass
    assert client.get_run(abandoned.info.run_id).info.status == "KILLED"
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert client.get_run(other.info.run_id).info.status == "RUNNING"  # another folder's


# ------------------------------------------------------------ 4. JSONL reads back what it writes

text = st.text(st.characters(codec="utf-8"), max_size=40)
floats = st.floats(allow_nan=False, allow_infinity=False)
RECORDS = {
    SeedTask: st.builds(
        SeedTask,
        id=text,
        name=text,
        instruction=text.filter(str.strip),
        instances=st.lists(st.builds(SeedInstance, input=text, output=text), min_size=1),
        is_classification=st.booleans(),
    ),
    InstructionRecord: st.builds(
        InstructionRecord,
        id=text,
        instruction=text.filter(str.strip),
        is_classification=st.booleans(),
        source=st.sampled_from(["seed", "machine"]),
        most_similar=st.dictionaries(text, floats, max_size=3),
        avg_similarity_score=st.none() | floats,
    ),
    ExampleRecord: st.builds(
        ExampleRecord,
        id=text,
        instruction_id=text,
        instruction=text,
        input=text,
        output=text,
        scores=st.dictionaries(text, floats, max_size=3),
        reward=st.none() | floats,
        policy=st.sampled_from(["rl", "base"]),
    ),
}


@pytest.mark.parametrize("model", list(RECORDS), ids=lambda m: m.__name__)
def test_4_every_record_type_round_trips_through_jsonl(model, tmp_path):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(RECORDS[model], max_size=6, unique_by=lambda r: r.id))
    def round_trip(rows):
        path = tmp_path / "rows.jsonl"
        records.write_jsonl(path, rows)
        assert records.read_records(path, model) == rows

    round_trip()


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\x1c", "\r", "\x0b"])
def test_4_line_separators_inside_strings_stay_inside(separator, tmp_path):
    row = ExampleRecord(
        id="e1", instruction_id="i", instruction="x", input=f"a{separator}b", output="y",
        policy="base",
    )  # fmt: skip
    records.write_jsonl(tmp_path / "e.jsonl", [row])
    assert records.read_records(tmp_path / "e.jsonl", ExampleRecord) == [row]


# ------------------------------------------------------------ 5. bounded input sizes


def test_5_oversized_instruction_exits_2_with_file_line(tmp_path, monkeypatch, capsys):
    rows = [seed(i) for i in range(10)]
    rows[6]["instruction"] = "word " * 200_000
    path = seeds_file(tmp_path / "seeds.jsonl", rows)
    code, _, err, out = instructions_cli(monkeypatch, capsys, tmp_path, "--seed-tasks", str(path))
    assert code == 2
    assert f"{path}:7: field 'instruction' has 1000000 characters" in err
    assert "limits.max_instruction_chars" in err
    assert not out.exists()


def test_5_limits_cover_nested_fields_and_are_configurable(tmp_path):
    rows = [seed(i) for i in range(10)]
    rows[2]["instances"][0]["output"] = "x" * 50
    path = seeds_file(tmp_path / "seeds.jsonl", rows)
    limits = load_config("local-cpu", ["limits.max_output_chars=49"]).limits.by_field()
    with pytest.raises(InputError, match=r":3: field 'instances\.0\.output' has 50"):
        records.read_records(path, SeedTask, limits)
    assert len(records.read_records(path, SeedTask, {"output": (50, "x")})) == 10


# ------------------------------------------------------------ 6. messages, not tracebacks


def _not_utf8_config(tmp_path: Path) -> list[str]:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    return ["--config", str(path)]


def _under_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "plain").write_text("x")
    return ["--seed-tasks", str(tmp_path / "plain" / "seeds.jsonl")]


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda p: ["--seed-tasks", str(p)], "is a folder; expected a JSONL file"),
        (_under_a_file, "a part of this path is a file, not a folder"),
        (_not_utf8_config, "bad.yaml: not UTF-8 text"),
        (lambda p: ["--seed-tasks", "s3://Bad_Bucket/x.jsonl"], "malformed S3 URI"),
        (lambda p: ["--seed-tasks", "s3://bucket/"], "names a bucket or prefix"),
    ],
    ids=["folder-as-file", "path-under-file", "config-not-utf8", "bad-bucket", "s3-prefix"],
)
def test_6_user_errors_exit_2_with_one_line(tmp_path, monkeypatch, capsys, make_args, message):
    code, _, err, _ = instructions_cli(monkeypatch, capsys, tmp_path, *make_args(tmp_path))
    assert code == 2, err
    assert message in err and "Traceback" not in err


@pytest.mark.integration
def test_6_s3_missing_credentials_exit_2_naming_the_uri(tmp_path, monkeypatch, capsys, s3_bucket):
    uri = f"s3://{s3_bucket}/seeds.jsonl"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage._client_for.cache_clear()
    code, _, err, _ = instructions_cli(monkeypatch, capsys, tmp_path, "--seed-tasks", uri)
    storage._client_for.cache_clear()
    assert code == 2, err
    assert f"{uri}: no S3 credentials" in err and "Traceback" not in err


@pytest.mark.parametrize("endpoint", ["closed", "black_hole"])
def test_6_unreachable_s3_endpoint_exits_1_in_bounded_time(
    tmp_path, monkeypatch, capsys, endpoint, black_hole
):
    url = black_hole if endpoint == "black_hole" else "http://127.0.0.1:9"
    monkeypatch.setenv("S3_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setattr(storage, "S3_READ_TIMEOUT_S", 2)
    storage._client_for.cache_clear()
    started = time.monotonic()
    code, _, err, _ = instructions_cli(
        monkeypatch, capsys, tmp_path, "--seed-tasks", "s3://bucket/s.jsonl"
    )
    storage._client_for.cache_clear()
    assert code == 1, err
    assert f"S3 endpoint {url} did not answer for s3://bucket/s.jsonl" in err
    assert "Traceback" not in err and time.monotonic() - started < 30


def test_6_full_disk_and_unexpected_errors_are_one_line_exit_1():
    full = OSError(errno.ENOSPC, "No space left on device", "/out/x.jsonl")
    assert cli._one_line(full) == (
        1, "no space left on the device writing /out/x.jsonl; free some and re-run"
    )  # fmt: skip
    code, message = cli._one_line(RuntimeError("boom\nsecond line"))
    assert code == 1 and message == "RuntimeError: boom (--debug shows the traceback)"


def test_6_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    path = tmp_path / "seeds.jsonl"
    path.mkdir()
    command = ["stage", "instructions", "--out", str(tmp_path / "o"), "--seed-tasks", str(path)]
    code, _, err = cli_output(monkeypatch, capsys, "--debug", *command)
    assert code == 2 and "Traceback" in err and "is a folder" in err
    monkeypatch.setattr(cli, "_debug", False)


# ------------------------------------------------------------ 8. s3:// in path flags


@pytest.mark.integration
def test_8_input_flags_keep_s3_uris(tmp_path, monkeypatch, capsys, s3_bucket):
    uri = f"s3://{s3_bucket}/data/seeds.jsonl"
    rows = [seed(i) for i in range(3)]
    boto3.client("s3").put_object(
        Bucket=s3_bucket, Key="data/seeds.jsonl",
        Body="".join(json.dumps(r) + "\n" for r in rows).encode(),
    )  # fmt: skip
    code, _, err, _ = instructions_cli(monkeypatch, capsys, tmp_path, "--seed-tasks", uri)
    assert code == 2 and f"{uri}: 3 seed tasks" in err  # read from S3, then judged

    for command, flag in (("rlaf", "--instructions"), ("instances", "--instructions"),
                          ("sft", "--examples")):  # fmt: skip
        missing = f"s3://{s3_bucket}/data/missing.jsonl"
        args = ["stage", command, flag, missing, "--out", str(tmp_path / command)]
        code, _, err = cli_output(monkeypatch, capsys, *args)
        assert code == 2 and f"{missing}: file not found" in err, err


def test_8_out_must_be_local(tmp_path, monkeypatch, capsys):
    code, _, err = cli_output(
        monkeypatch, capsys, "stage", "instructions", "--out", "s3://b/out",
        "--workspace", str(tmp_path),
    )  # fmt: skip
    assert code == 2 and "output folders are local" in err


# ------------------------------------------------------------ 9. bad seeds stop at stage 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({3: {"id": "s1"}}, ":4: field 'id': 's1' repeats the id of line 2"),
        ({5: {"instruction": " \t "}}, ":6: field 'instruction': Value error, must contain text"),
    ],
)
def test_9_duplicate_ids_and_blank_instructions_exit_2(
    tmp_path, monkeypatch, capsys, change, message
):
    rows = [seed(i) for i in range(10)]
    for index, fields in change.items():
        rows[index].update(fields)
    path = seeds_file(tmp_path / "seeds.jsonl", rows)
    code, _, err, out = instructions_cli(monkeypatch, capsys, tmp_path, "--seed-tasks", str(path))
    assert code == 2 and message in err, err
    assert not out.exists()


# ------------------------------------------------------------ 10. resume with other settings


def test_10_resume_with_other_sampling_is_refused_unless_forced(tmp_path):
    out = tmp_path / "out"
    first = load_config("local-cpu", ["stage1.num_instructions=4"])
    instructions.run(first, out, ScriptedBackend(), workspace=tmp_path)
    changed = load_config("local-cpu", ["stage1.num_instructions=8", "generation.temperature=0.9"])
    with pytest.raises(InputError, match=r"different settings: generation\.temperature;"):
        instructions.check(changed, out, tmp_path)
    with pytest.raises(InputError, match=r"generation\.seed, generation\.temperature"):
        reseeded = load_config("local-cpu", ["generation.temperature=0.9", "generation.seed=1"])
        instructions.run(reseeded, out, ScriptedBackend(), workspace=tmp_path)

    result = instructions.run(
        changed, out, ScriptedBackend(), workspace=tmp_path, force_resume=True
    )
    assert result.summary["accepted"] == 8
    assert result.summary["config_hashes"] == [first.config_hash(), changed.config_hash()]
    resume = [e for e in records.read_journal(out / "journal.jsonl") if e["event"] == "resume"]
    assert resume[-1]["forced"] == ["generation.temperature"]


def test_10_force_resume_via_the_cli(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    instructions.run(
        load_config("local-cpu", ["stage1.num_instructions=2"]), out, ScriptedBackend(),
        workspace=tmp_path / "ws",
    )  # fmt: skip
    code, _, err, _ = instructions_cli(
        monkeypatch, capsys, tmp_path, "--set", "generation.seed=7", "--set",
        "stage1.num_instructions=2",
    )  # fmt: skip
    assert code == 2 and "generation.seed" in err and "--force-resume" in err


# ------------------------------------------------------------ 12. smaller ones


def test_12_summary_seconds_count_every_invocation(tmp_path):
    out = tmp_path / "out"
    config = load_config("local-cpu", ["stage1.num_instructions=30", "stage1.prompts_per_round=2"])

    class Slow(ScriptedBackend):
        def __init__(self, rounds):
            super().__init__(delay_s=0.2)
            self.rounds = rounds

        def generate(self, prompts, params, *, chat=False):
            if self.calls == self.rounds:
                raise KeyboardInterrupt
            return super().generate(prompts, params, chat=chat)

    with pytest.raises(KeyboardInterrupt):
        instructions.run(config, out, Slow(rounds=3), workspace=tmp_path)
    result = instructions.run(config, out, Slow(rounds=10**6), workspace=tmp_path)
    rounds = result.summary["rounds"]
    assert rounds > 3  # 3 in the first invocation, the rest in the second
    assert result.summary["seconds"] >= 0.2 * rounds - 0.05  # both invocations' rounds


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "generation.temperature=.inf",
            "--set generation.temperature=.inf: generation.temperature",
        ),
        ("stage2.kl_coef=.nan", "--set stage2.kl_coef=.nan: stage2.kl_coef"),
        ("stage1.num_instructions=true", "num_instructions: expected a number, got true"),
        ("stage4.learning_rate=false", "learning_rate: expected a number, got false"),
    ],
)
def test_12_infinite_and_boolean_numbers_are_refused_and_blamed_on_the_set(override, message):
    with pytest.raises(InputError) as caught:
        load_config("local-cpu", [override])
    assert message in str(caught.value)
    assert "preset local-cpu" not in str(caught.value)


def test_12_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage1:\n  num_instructions: 3\n  max_rounds: 2\n  num_instructions: 9\n")
    with pytest.raises(InputError, match=r"'num_instructions' repeats the key of line 2"):
        load_config(str(path))


# ------------------------------------------------------------ 11. work kept across a kill

CLI = str(Path(sys.executable).with_name("refine-af"))


def _sft_command(examples: Path, out: Path, model: Path, ws: Path, *sets: str) -> list[str]:
    overrides = [
        f"model.base={model}", "stage4.max_steps=12", "stage4.save_steps=2",
        "stage4.per_device_batch_size=2", "stage4.max_length=64", *sets,
    ]  # fmt: skip
    args = [arg for item in overrides for arg in ("--set", item)]
    return [CLI, "stage", "sft", "-e", str(examples), "-o", str(out), "--workspace", str(ws), *args]


@pytest.mark.slow
def test_11_sft_killed_mid_training_resumes_from_its_checkpoint(tmp_path, tiny_causal_lm_dir):
    from test_sft import example_rows, write_rows

    examples = write_rows(tmp_path / "examples.jsonl", example_rows())
    out = tmp_path / "out"
    command = _sft_command(
        examples, out, tiny_causal_lm_dir, tmp_path / "ws", "stage4.register_model=false"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if list((out / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists(), "killed too late: training had finished"

    subprocess.run(command, env=env, check=True, capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_checkpoint"] and summary["steps"] == 12
    assert int(summary["resumed_from_checkpoint"].rsplit("-", 1)[1]) >= 2
    assert not (out / "checkpoints").exists()  # cleaned once the adapter is published
    assert [p.name for p in out.iterdir() if p.name.startswith(".adapter")] == []
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing left in the temp directory


def test_11_a_checkpoint_cut_while_saving_is_not_resumed(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / training.CHECKPOINTS_DIR / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        if complete:  # the trainer writes its state last
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / training.RUN_KEY).write_text(json.dumps({"k": 1}))
    resumed = training.resumable_checkpoint(tmp_path, {"k": 1}, "")
    assert resumed == str(tmp_path / training.CHECKPOINTS_DIR / "checkpoint-4")


def test_11_failed_s3_mirror_leaves_no_download_folder(tmp_path, monkeypatch):
    from refine_af import models
    from refine_af.errors import StorageUnavailable

    monkeypatch.setenv("REFINE_AF_CACHE", str(tmp_path / "cache"))

    def unreachable(uri, local_dir):
        Path(local_dir).mkdir(parents=True)
        raise StorageUnavailable("S3 endpoint gone")

    monkeypatch.setattr(storage, "download_dir", unreachable)
    with pytest.raises(StorageUnavailable):
        models.resolve("s3://bucket/models/m")
    assert not list((tmp_path / "cache").rglob(".download-*"))


@pytest.mark.slow
def test_12_rerunning_sft_does_not_register_a_duplicate_version(tmp_path, tiny_causal_lm_dir):
    from test_sft import example_rows, write_rows

    examples = write_rows(tmp_path / "examples.jsonl", example_rows())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    versions = []
    for attempt in range(2):
        out = tmp_path / f"out{attempt}"
        command = _sft_command(
            examples, out, tiny_causal_lm_dir, tmp_path / "ws", "stage4.max_steps=2"
        )
        subprocess.run(command, env=env, check=True, capture_output=True)
        versions.append(json.loads((out / "summary.json").read_text())["registered_version"])
    assert versions == ["1", "1"]
    client = tracking.connect(tmp_path / "ws")
    assert len(client.search_model_versions("name = 'refine-af-model'")) == 1


def _instances_command(instructions_file: Path, out: Path, model: Path, ws: Path, *sets: str):
    overrides = [
        f"model.base={model}", f"stage2.scorers.llm_judge.model={model}",
        "stage3.samples_per_instruction=2", "stage3.max_new_tokens=12",
        "generation.batch_size=2", *sets,
    ]  # fmt: skip
    args = [arg for item in overrides for arg in ("--set", item)]
    return [CLI, "stage", "instances", "-i", str(instructions_file), "-o", str(out),
            "--workspace", str(ws), *args]  # fmt: skip


def _blocks_in(out: Path) -> list[dict]:
    """The journal's finished blocks, read without touching a line being written."""
    path = out / journal.JOURNAL
    complete = path.read_bytes().split(b"\n")[:-1] if path.exists() else []
    return [e for e in map(json.loads, complete) if e["event"] == "block"]


@pytest.mark.slow
def test_11_instances_resume_after_kill_mid_shard_equals_an_uninterrupted_run(
    tmp_path, tiny_causal_lm_dir
):
    from test_instances import write_instructions

    instructions_file = write_instructions(tmp_path / "instructions.jsonl", 24)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        return _instances_command(instructions_file, out, tiny_causal_lm_dir, tmp_path / "ws")

    subprocess.run(command(tmp_path / "whole"), env=env, check=True, capture_output=True)
    blocks = len(_blocks_in(tmp_path / "whole"))
    assert blocks == 24  # one instruction of two samples per block of batch size 2

    out = tmp_path / "killed"
    process = subprocess.Popen(command(out), env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and len(_blocks_in(out)) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = len(_blocks_in(out))
    assert 3 <= before < blocks, "killed too late: the shard had finished"
    assert not (out / "examples.jsonl").exists()

    subprocess.run(command(out), env=env, check=True, capture_output=True)
    events = records.read_journal(out / journal.JOURNAL)
    assert [e["event"] for e in events].count("resume") == 1
    written = [tuple(e["ids"]) for e in events if e["event"] == "block"]
    assert len(written) == len(set(written)) == blocks  # none generated twice, none missing
    for name in ("examples.jsonl", "filtered.jsonl", "quarantine.jsonl", "alpaca.json"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


class SlowWriter:
    """Test_instances' stand-in model, taking ``delay_s`` a block; interrupted after ``calls``."""

    def __init__(self, delay_s: float, calls: int) -> None:
        from test_instances import SeededWriter

        self.writer, self.delay_s, self.calls = SeededWriter(), delay_s, calls

    def generate(self, prompts, params, *, chat=False):
        if len(self.writer.calls) == self.calls:
            raise KeyboardInterrupt
        time.sleep(self.delay_s)
        return self.writer.generate(prompts, params, chat=chat)


def test_12_instances_summary_seconds_count_every_invocation(tmp_path):
    from test_instances import fake_reward, stage_config, write_instructions

    config = stage_config()
    path = write_instructions(tmp_path / "instructions.jsonl", 11)  # 6 blocks
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        instances.run(
            config, path, out, SlowWriter(1.0, 4), fake_reward(config), workspace=tmp_path
        )
    assert len(_blocks_in(out)) == 4
    result = instances.run(
        config, path, out, SlowWriter(0.0, 10**6), fake_reward(config), workspace=tmp_path
    )
    assert result.summary["instructions"] == 11
    blocks = [e["seconds"] for e in _blocks_in(out)]
    assert len(blocks) == 6 and sum(blocks[:4]) >= 4.0  # the first invocation's blocks
    assert result.summary["seconds"] >= sum(blocks) - 0.05  # counted, with the second's


def test_10_instances_resume_with_other_settings_is_refused_unless_forced(
    tmp_path, monkeypatch, capsys
):
    from test_instances import SeededWriter, fake_reward, stage_config, write_instructions

    path = write_instructions(tmp_path / "instructions.jsonl", 5)
    out = tmp_path / "out"
    first = stage_config()
    instances.run(first, path, out, SeededWriter(), fake_reward(first), workspace=tmp_path)
    changed = stage_config("generation.temperature=0.9", "stage3.min_reward=1.0")
    with pytest.raises(
        InputError, match=r"different settings: generation\.temperature, stage3\.min_reward;"
    ):
        instances.run(changed, path, out, SeededWriter(), fake_reward(changed), workspace=tmp_path)
    code, _, err = cli_output(
        monkeypatch, capsys, "stage", "instances", "-i", str(path), "-o", str(out),
        "--workspace", str(tmp_path), "--set", "generation.batch_size=8",
        "--set", "stage3.samples_per_instruction=4", "--set", "stage3.max_per_instruction=3",
        "--set", "generation.seed=7",
    )  # fmt: skip
    assert code == 2 and "generation.seed" in err and "--force-resume" in err, err
    writer = SeededWriter()
    result = instances.run(
        changed, path, out, writer, fake_reward(changed), workspace=tmp_path, force_resume=True
    )
    assert writer.calls == []  # the same blocks: nothing generated again
    assert result.summary["config_hash"] == changed.config_hash()
    resume = [e for e in records.read_journal(out / journal.JOURNAL) if e["event"] == "resume"]
    assert resume[-1]["forced"] == ["generation.temperature", "stage3.min_reward"]


# ------------------------------------------------------------ 7. submit does not hang


def test_7_submit_to_a_silent_host_times_out_with_one_line(
    tmp_path, black_hole, monkeypatch, capsys
):
    started = time.monotonic()
    code, _, err = cli_output(
        monkeypatch, capsys, "submit", "--host", black_hole, "--api-timeout", "2",
        "--package", "pipelines/refine_af.yaml",
    )  # fmt: skip
    assert code == 1, err
    assert f"KFP API at {black_hole} did not accept the run within 2 s" in err
    assert "Traceback" not in err and time.monotonic() - started < 30


@pytest.mark.parametrize("command", ["rlaf", "instances", "sft"])
def test_5_every_stage_applies_the_limits(command, tmp_path, monkeypatch, capsys):
    from test_sft import example_rows, write_rows

    if command == "sft":
        rows = example_rows()
        rows[4]["output"] = "y" * 30
        path, flag = write_rows(tmp_path / "examples.jsonl", rows), "-e"
    else:
        rows = [
            InstructionRecord(
                id=f"m{i}", instruction="Name it. " * (i + 1), is_classification=False,
                source="machine",
            ).model_dump(mode="json")
            for i in range(5)
        ]  # fmt: skip
        path, flag = write_rows(tmp_path / "instructions.jsonl", rows), "-i"
    sets = ["--set", "limits.max_instruction_chars=20", "--set", "limits.max_output_chars=20"]
    code, _, err = cli_output(
        monkeypatch, capsys, "stage", command, flag, str(path), "-o", str(tmp_path / "o"), *sets
    )
    assert code == 2 and f"{path}:" in err and "characters; the limit is 20" in err, err
    assert not (tmp_path / "o").exists()


def test_1_a_run_that_wrote_nothing_leaves_no_folder(tmp_path):
    with pytest.raises(InputError), locking.output_lock(tmp_path / "new"):
        raise InputError("bad input found after the lock")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with locking.output_lock(tmp_path / "old"):
        pass
    assert (tmp_path / "old").is_dir()  # a folder the user made stays
