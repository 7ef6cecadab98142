"""The evaluate component, called as KFP calls it, on a tiny model's LoRA adapter."""

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from kfp import dsl

from components.evaluate.component import evaluate
from refine_af import tracking
from refine_af.config import load_config
from refine_af.stages import register

TASKS = ("task_a", "task_b")


def model_artifact(tmp_path: Path, name: str, adapter: Path) -> dsl.Model:
    """A training step's output folder: the adapter under ``adapter/``."""
    model = dsl.Model(name=name, uri=str(tmp_path / name))
    shutil.copytree(adapter, Path(model.path) / "adapter")
    return model


def register_version(workspace: Path, name: str, adapter: Path) -> str:
    """A registered version as stage 4 leaves one (its files are not read here)."""
    client = tracking.connect(workspace)
    with tracking.stage_run("finetune", workspace) as run:
        mlflow.log_artifacts(str(adapter), "model", run_id=run.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return str(client.create_model_version(name, f"runs:/{run.run_id}/model", run.run_id).version)


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINE_AF_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return (
        dsl.Dataset(name="results", uri=str(tmp_path / "results")),
        dsl.Markdown(name="report", uri=str(tmp_path / "report.md")),
        dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics")),
    )


def test_a_config_that_does_not_match_its_hash_stops_with_exit_2(outputs, tmp_path, capsys):
    results, report, metrics = outputs
    candidate = dsl.Model(name="candidate", uri=str(tmp_path / "candidate"))
    with pytest.raises(SystemExit) as stopped:
        evaluate.python_func(
            config=load_config("local-cpu").to_yaml(), config_hash="0" * 12, parent_run_id="",
            candidate=candidate, version="", results=results, report=report, metrics=metrics,
        )  # fmt: skip
    assert stopped.value.code == 2
    assert "not '000000000000' as recorded" in capsys.readouterr().err
    assert not Path(results.path).exists() and not Path(report.path).exists()


@pytest.mark.slow
def test_scores_candidate_and_baseline_tags_the_versions_and_returns_pct_improved(
    outputs, tmp_path, tiny_causal_lm_dir, tiny_lora_adapter_dir
):
    results, report, metrics = outputs
    data = tmp_path / "superni.jsonl"
    rows = [
        {"task": task, "id": f"{task}-{n}", "definition": f"Answer for {task}.",
         "input": f"Question {n}?", "references": ["yes", f"answer {n}"]}
        for task in TASKS
        for n in range(2)
    ]  # fmt: skip
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = load_config(
        "local-cpu",
        [
            f"stage5.data={data}",
            f"stage5.tasks={list(TASKS)}",
            "stage5.per_task=2",
            "stage5.max_new_tokens=4",
            "stage5.batch_size=4",
            "stage5.bootstrap_samples=200",
        ],
        base_model=str(tiny_causal_lm_dir),
    )
    # the same adapter on both sides: greedy decoding scores them alike, every task a tie
    candidate = model_artifact(tmp_path, "candidate", tiny_lora_adapter_dir)
    baseline = model_artifact(tmp_path, "baseline", tiny_lora_adapter_dir)
    workspace, model_name = tmp_path / "ws", config.stage6.model_name
    baseline_version = register_version(workspace, model_name, tiny_lora_adapter_dir)
    version = register_version(workspace, model_name, tiny_lora_adapter_dir)
    pct_improved = evaluate.python_func(
        config=config.to_yaml(), config_hash=config.config_hash(), parent_run_id="",
        candidate=candidate, version=version, results=results, report=report, metrics=metrics,
        baseline=baseline, baseline_version=baseline_version,
    )  # fmt: skip
    folder = Path(results.path)
    compared = json.loads((folder / "comparison.json").read_text())
    assert pct_improved == compared["pct_improved"] == 0.0
    assert compared["tasks"] == compared["ties"] == 2
    for name in ("candidate", "baseline"):
        saved = json.loads((folder / name / "evaluation.json").read_text())
        assert set(saved["tasks"]) == set(TASKS)
        assert (folder / name / "predictions.jsonl").is_file()
    assert Path(report.path).read_text() == (folder / "report.md").read_text()
    assert "| tasks improved |" in Path(report.path).read_text()
    figures = metrics.metadata
    assert figures["candidate_rougeL"] == figures["baseline_rougeL"]
    assert (figures["pct_tasks_improved"], figures["mean_delta"]) == (0.0, 0.0)
    assert results.metadata["config_hash"] == config.config_hash()
    assert results.metadata["ties"] == 2 and results.metadata["pct_improved"] == 0.0
    client = tracking.connect(workspace)
    challenger = client.get_model_version_by_alias(model_name, register.CHALLENGER)
    assert str(challenger.version) == version
    assert challenger.tags[register.BASELINE_VERSION_TAG] == baseline_version
    marked_baseline = client.get_model_version_by_alias(model_name, register.BASELINE)
    assert str(marked_baseline.version) == baseline_version
