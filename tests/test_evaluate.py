"""Stage 5 end to end on a tiny model: generation, scores, report, MLflow, bad input."""

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from cli_runner import run_cli

from refine_af import models, tracking
from refine_af.config import RunConfig, load_config
from refine_af.errors import InputError
from refine_af.stages import evaluate

TASKS = ("task_a_classification", "task_b_generation", "task_c_unused")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("superni") / "tasks.jsonl"
    rows = [
        {
            "task": task,
            "id": f"{task}-{n}",
            "definition": f"Answer the question for {task}.",
            "input": f"Question number {n}?",
            "references": ["yes", f"answer {n}"],
        }
        for task in TASKS
        for n in range(3)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def local_tracking() -> Iterator[None]:
    """Runs go to the workspace's sqlite store, not to a server set in the environment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        yield


@pytest.fixture(scope="module")
def workspace(local_tracking: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the module: creating an MLflow sqlite schema takes seconds."""
    return tmp_path_factory.mktemp("ws")


def config_for(base: Path, data: Path, *extra: str) -> RunConfig:
    return load_config(
        "local-cpu",
        [
            f"model.base={base}",
            f"stage5.data={data}",
            f"stage5.tasks={list(TASKS[:2])}",
            "stage5.per_task=2",
            "stage5.max_new_tokens=4",
            "stage5.batch_size=4",
            "stage5.bootstrap_samples=200",
            *extra,
        ],
    )


def test_adapter_against_its_base(
    tiny_causal_lm_dir: Path,
    tiny_lora_adapter_dir: Path,
    data_file: Path,
    workspace: Path,
    tmp_path: Path,
) -> None:
    config = config_for(tiny_causal_lm_dir, data_file)
    out = tmp_path / "eval"
    seen: dict[str, int] = {}
    outcome = evaluate.run(
        config,
        out,
        candidate=str(tiny_lora_adapter_dir),
        baseline=str(tiny_causal_lm_dir),
        workspace=workspace,
        on_progress=lambda name, done, total: seen.__setitem__(name, done),
    )
    assert seen == {"candidate": 4, "baseline": 4}
    for name in ("candidate", "baseline"):
        rows = [json.loads(line) for line in (out / name / "predictions.jsonl").open()]
        assert [r["id"] for r in rows] == [f"{t}-{n}" for t in TASKS[:2] for n in range(2)]
        assert all(0.0 <= r["rougeL"] <= 100.0 for r in rows)
        saved = json.loads((out / name / "evaluation.json").read_text())
        assert saved["mlflow_run_id"] == outcome.run_id
        assert saved["mlflow_artifact"] == f"{name}/evaluation.json"
        assert set(saved["tasks"]) == set(TASKS[:2])
    compared = json.loads((out / "comparison.json").read_text())
    assert compared["tasks"] == 2
    assert compared["improved"] + compared["worse"] + compared["ties"] == 2
    assert "| tasks improved |" in (out / "report.md").read_text()
    assert (out / "deltas.png").stat().st_size > 0

    client = mlflow.MlflowClient(tracking.tracking_uri(workspace))
    logged = client.get_run(outcome.run_id)
    assert logged.data.tags["refine_af.candidate"] == str(tiny_lora_adapter_dir)
    assert "pct_tasks_improved" in logged.data.metrics
    assert "candidate.task.task_a_classification" in logged.data.metrics
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"candidate", "baseline", "comparison.json", "report.md", "deltas.png"} <= artifacts

    # An earlier result serves as the baseline without loading that model again.
    again = evaluate.run(
        config,
        tmp_path / "again",
        candidate=str(tiny_lora_adapter_dir),
        baseline=str(out / "baseline" / "evaluation.json"),
        workspace=workspace,
    )
    assert not (tmp_path / "again" / "baseline").exists()
    assert again.comparison.model_dump() == outcome.comparison.model_dump()

    # A result scored on another subset stops before any output is written.
    with pytest.raises(InputError, match="other tasks or instances"):
        evaluate.run(
            config_for(tiny_causal_lm_dir, data_file, "stage5.per_task=3"),
            tmp_path / "mismatch",
            candidate=str(tiny_causal_lm_dir),
            baseline=str(out / "baseline" / "evaluation.json"),
            workspace=workspace,
        )
    assert not (tmp_path / "mismatch").exists()


def test_adapter_of_another_base_is_refused(
    tiny_lora_adapter_dir: Path, bundled_model_dir: Path
) -> None:
    with pytest.raises(InputError, match="was trained on base"):
        models.adapter_base_location(str(tiny_lora_adapter_dir), "smollm2-135m-instruct")
    assert models.adapter_base_location(str(bundled_model_dir)) is None


def test_cli_compares_two_results_and_reports(
    tiny_causal_lm_dir: Path,
    data_file: Path,
    workspace: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = tmp_path / "first"
    evaluate.run(
        config_for(tiny_causal_lm_dir, data_file),
        first,
        candidate=str(tiny_causal_lm_dir),
        workspace=workspace,
    )
    assert (first / "report.md").read_text().startswith("# SuperNI evaluation")
    result = str(first / "candidate" / "evaluation.json")
    code = run_cli(
        monkeypatch,
        "stage", "evaluate", "--model", result, "--baseline", result,
        "--out", str(tmp_path / "cmp"), "--workspace", str(workspace),
    )  # fmt: skip
    assert code == 0
    assert "tasks tied" in capsys.readouterr().out
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["ties"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-alias"], "model 'no-such-alias' not found"),
        (["--data", "{empty}"], "no evaluation instances"),
        (["--data", "{missing_field}"], "field 'references'"),
    ],
)
def test_cli_bad_input_exits_2_before_output(
    args: list[str],
    message: str,
    tmp_path: Path,
    local_tracking: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "missing.jsonl").write_text('{"task": "t", "id": "1", "definition": "d"}\n')
    paths = {"empty": tmp_path / "empty.jsonl", "missing_field": tmp_path / "missing.jsonl"}
    args = [a.format(**paths) for a in args]
    out, workspace = tmp_path / "out", tmp_path / "ws"
    code = run_cli(
        monkeypatch, "stage", "evaluate", *args, "--out", str(out),
        "--workspace", str(workspace),
    )  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert not workspace.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage5.prompt_template='Input: {input}'", "exactly the placeholders"),
        ("stage5.tasks=0", "tasks must be at least 1"),
        ("stage5.tasks=[]", "tasks must name at least one task"),
        ("stage6.min_pct_tasks_improved=101", "less than or equal to 100"),
    ],
)
def test_stage5_and_stage6_settings_are_checked(override: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_config("local-cpu", [override])
    assert load_config("local-cpu", ["stage5.tasks=[t1, t2]"]).stage5.tasks == ["t1", "t2"]
