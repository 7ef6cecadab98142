"""Training steps under ``accelerate launch`` (what the rlaf and sft pipeline steps run):
the command line, and one real CPU run of stage 4 through it with one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_sft import example_rows, write_rows

from refine_af import launch
from refine_af.config import load_config


def test_command_launches_the_stage_with_one_process_per_gpu():
    one = launch.command(1, "rlaf", ["-i", "in.jsonl"], python="py")
    assert one == [
        "py", "-m", "accelerate.commands.launch", "--num_machines", "1",
        "--num_processes", "1", "-m", "refine_af.cli", "stage", "rlaf", "-i", "in.jsonl",
    ]  # fmt: skip
    four = launch.command(4, "sft", [], python="py")
    assert four[four.index("--num_processes") + 1] == "4" and "--multi_gpu" in four
    assert "--multi_gpu" not in one
    with pytest.raises(ValueError, match="at least 1"):
        launch.command(0, "sft", [])


def test_stage_args_carry_the_resolved_configuration_and_the_parent_run():
    args = launch.stage_args("name: x\n", "abc", Path("/ws"), "run-1")
    assert args == [
        "--config", "name: x\n", "--config-hash", "abc", "--workspace", "/ws",
        "--parent-run-id", "run-1",
    ]  # fmt: skip
    assert "--parent-run-id" not in launch.stage_args("name: x\n", "abc", Path("/ws"), "")


@pytest.mark.slow
def test_sft_runs_under_accelerate_launch_on_cpu(tmp_path: Path, monkeypatch):
    """The sft step's path on the cpu profile: accelerate launch, one process, the CLI."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    examples = write_rows(tmp_path / "examples.jsonl", example_rows())
    out = tmp_path / "out"
    overrides = [
        "stage4.max_steps=1",
        "stage4.per_device_batch_size=2",
        "stage4.max_length=64",
        "stage4.eval_fraction=0.1",
        "stage4.register_model=false",
    ]
    config = load_config("local-cpu", overrides)
    args = [
        "--examples", str(examples), "--out", str(out),
        *launch.stage_args(config.to_yaml(), config.config_hash(), tmp_path / "workspace", ""),
    ]  # fmt: skip
    summary = launch.run_stage(1, "sft", args, out)
    assert summary["steps"] == 1
    assert summary["registered_version"] is None
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "summary.json").read_text()) == summary


def test_a_failed_launch_stops_the_step(tmp_path: Path):
    with pytest.raises(SystemExit, match="accelerate launch of stage sft failed"):
        launch.run_stage(1, "sft", ["--examples", str(tmp_path / "missing.jsonl"),
                                    "--out", str(tmp_path / "o")], tmp_path / "o")  # fmt: skip
