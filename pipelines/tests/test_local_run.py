"""The whole pipeline under KFP's local runner with tiny settings and the bundled model."""

import json
import re
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


def check_promotion(kfp: Path, client: MlflowClient, comparison: dict, stdout: str):
    """The registry, the run summary and the output say the decision the comparison implies.

    Returns (passed, decision).
    """
    # A fresh registry has no champion: the gate (local-cpu: ≥ 50% of tasks improved, no
    # drop of the mean) against the run's baseline alone decides.
    passed = comparison["pct_improved"] >= 50.0 and comparison["mean_delta"] >= 0.0
    decision = "promoted" if passed else "rejected"
    versions = client.search_model_versions("name = 'refine-af-model'")
    by_policy = {v.tags["refine_af.policy"]: v for v in versions}
    assert len(versions) == 2 and set(by_policy) == {"rl", "base"}
    rl, base = str(by_policy["rl"].version), str(by_policy["base"].version)
    model = client.get_registered_model("refine-af-model")
    expected = {"challenger": rl, "baseline": base} | ({"champion": rl} if passed else {})
    assert {alias: str(v) for alias, v in model.aliases.items()} == expected
    tags = by_policy["rl"].tags
    assert tags["refine_af.promotion.decision"] == decision
    assert tags["refine_af.eval.baseline_version"] == base
    assert tags["refine_af.promotion.baseline.pct_tasks_improved"] == (
        f"{comparison['pct_improved']:.2f}"
    )
    assert tags["refine_af.template"] == "chat"  # the bundled model has a chat template
    for version in versions:  # lineage
        for key in ("config_hash", "parent_run_id", "dataset_sha256", "base_model"):
            assert version.tags[f"refine_af.{key}"], key
    pct = f"{comparison['pct_improved']:.1f}% of tasks improved over the baseline v{base}"
    run_summary = _only(kfp, "promote/summary").read_text()
    assert f"- promotion: {decision}: " in run_summary and pct in run_summary
    assert re.search(rf"^promotion +{decision}: ", stdout, re.MULTILINE)
    assert pct in stdout and "gate needs ≥ 50%" in stdout
    return passed, decision


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

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    passed, decision = check_promotion(kfp, client, comparison, result.stdout)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get("refine_af.stage") == "pipeline")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.tags["refine_af.stage"] for r in children}
    assert stages >= {"instructions", "rlaf", "instances", "instances-merge", "sft", "evaluate"}
    assert parent.data.metrics["instructions_kept"] == 4
    assert parent.data.metrics["promoted"] == float(passed)
    assert parent.data.tags["refine_af.promotion"].startswith(f"{decision}: ")
