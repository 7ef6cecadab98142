"""The instructions component under KFP's local runner (the same process model as a pod)."""

import json
from pathlib import Path

from components.instructions.component import instructions


def test_writes_the_stage_folder_and_metrics(local_runner, tiny_causal_lm_dir):
    overrides = [
        "stage1.num_instructions=2",
        "stage1.max_rounds=2",
        "stage1.prompts_per_round=2",
        "stage1.max_new_tokens=12",
        "stage1.detect_classification=false",
    ]
    task = instructions(
        config="local-cpu",
        overrides=overrides,
        base_model=str(tiny_causal_lm_dir),
    )
    folder = Path(task.outputs["pool"].path)
    summary = json.loads((folder / "summary.json").read_text())
    assert task.outputs["Output"] == summary["accepted"]
    assert summary["rounds"] == 2 or summary["reached_target"]
    assert {p.name for p in folder.iterdir()} >= {
        "instructions.jsonl",
        "filtered.jsonl",
        "quarantine.jsonl",
        "summary.json",
    }
    assert task.outputs["pool"].metadata["config_hash"] == summary["config_hash"]
    assert "mlflow_parent_run_id" not in task.outputs["pool"].metadata
