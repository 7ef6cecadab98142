"""The whole pipeline under KFP's local runner with tiny settings and the bundled model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

TINY = [
    "stage1.num_instructions=4",
    "stage1.prompts_per_round=4",
    "stage2.max_steps=2",
    "stage3.samples_per_instruction=2",
    "stage4.max_steps=2",
    "stage5.tasks=2",
    "stage5.per_task=2",
]


def _only(root: Path, pattern: str) -> Path:
    (found,) = sorted(root.glob(pattern))
    return found


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_runs_end_to_end(tmp_path, bundled_model_dir):
    workspace = tmp_path / "workspace"
    command = [sys.executable, "-m", "pipelines.run_local", "--workspace", str(workspace)]
    for override in TINY:
        command += ["--set", override]
    result = subprocess.run(
        [*command, "--shards", "2"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refine-af-model v1 (challenger, champion)" in result.stdout

    kfp = _only(workspace / "kfp", "refine-af-*")
    pool = _only(kfp, "instructions/pool")
    summary = json.loads((pool / "summary.json").read_text())
    assert summary["accepted"] == 4
    assert (_only(kfp, "rlaf/policy") / "adapter" / "adapter_config.json").is_file()
    shard_folders = sorted(kfp.glob("for-loop-*-iteration-*/instances*/examples"))
    assert len(shard_folders) == 4  # 2 shards × (RL policy, baseline)
    datasets = sorted(kfp.glob("merge*/dataset"))
    policies = {json.loads((d / "summary.json").read_text())["policy"] for d in datasets}
    assert policies == {"rl", "base"}
    for dataset in datasets:
        assert (dataset / "examples.jsonl").is_file() and (dataset / "alpaca.json").is_file()
    adapters = sorted(kfp.glob("sft*/model/adapter/adapter_config.json"))
    assert len(adapters) == 2
    comparison = json.loads((_only(kfp, "evaluate/results") / "comparison.json").read_text())
    assert comparison["tasks"] == 2
    run_summary = _only(kfp, "promote/summary").read_text()
    assert "aliases: challenger, champion" in run_summary

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    (version,) = client.search_model_versions("name = 'refine-af-model'")
    assert version.tags["refine_af.policy"] == "rl"
    model = client.get_registered_model("refine-af-model")
    assert {alias: str(v) for alias, v in model.aliases.items()} == {
        "challenger": "1",
        "champion": "1",
    }
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get("refine_af.stage") == "pipeline")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.tags["refine_af.stage"] for r in children}
    assert stages >= {"instructions", "rlaf", "instances", "instances-merge", "sft", "evaluate"}
    assert parent.data.metrics["instructions_kept"] == 4
