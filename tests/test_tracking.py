"""tracking: flattening, URI choice, and stage runs against a real MLflow server."""

import socket
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from refine_af import tracking


@pytest.fixture
def server_uri(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return mlflow_server


def test_flatten_nests_with_dots_and_truncates_long_values() -> None:
    flat = tracking.flatten({"model": {"name": "m", "lora": {"r": 8}}, "seed": 1, "x": None})
    assert flat == {"model.name": "m", "model.lora.r": "8", "seed": "1", "x": "None"}
    long = tracking.flatten({"prompt": "y" * (MAX_PARAM_VAL_LENGTH + 10)})["prompt"]
    assert len(long) == MAX_PARAM_VAL_LENGTH
    assert long.endswith(tracking.TRUNCATION_MARK)


def test_tracking_uri_defaults_to_sqlite_in_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking.tracking_uri(tmp_path) == "http://tracking:5000"


def test_stage_run_local_sqlite_keeps_everything_in_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    workspace = tmp_path / "ws"
    with tracking.stage_run("bootstrap", workspace, params={"a": {"b": 1}}) as run:
        run.log_text("sample", "samples.txt")
    client = mlflow.MlflowClient(tracking.tracking_uri(workspace))
    assert client.get_run(run.run_id).data.params == {"a.b": "1"}
    assert list((workspace / "mlartifacts").rglob("samples.txt"))
    assert not (tmp_path / "mlruns").exists()
    assert not mlflow.tracking.is_tracking_uri_set()  # global state restored


@pytest.mark.integration
def test_stage_run_logs_params_metrics_artifacts(server_uri: str, tmp_path: Path) -> None:
    (tmp_path / "plot.txt").write_text("a plot")
    with tracking.stage_run(
        "instances", tmp_path, params={"gen": {"temperature": 0.7}}, tags={"policy": "rl"}
    ) as run:
        run.log_metrics({"kept": 3.0, "quarantined": 1.0})
        run.log_metrics({"reward": 0.5}, step=2)
        run.log_artifact(tmp_path / "plot.txt")
        run.log_dict({"n": 3}, "summary.json")
        run.log_text("hello", "samples/first.txt")

    client = mlflow.MlflowClient(server_uri)
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.info.run_name == "instances"
    assert logged.data.params == {"gen.temperature": "0.7"}
    assert logged.data.metrics == {"kept": 3.0, "quarantined": 1.0, "reward": 0.5}
    assert logged.data.tags["policy"] == "rl"
    assert client.get_experiment(logged.info.experiment_id).name == tracking.DEFAULT_EXPERIMENT
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert artifacts == {"plot.txt", "summary.json", "samples"}
    local = client.download_artifacts(run.run_id, "summary.json", str(tmp_path))
    assert Path(local).read_text().strip().startswith("{")


@pytest.mark.integration
def test_stage_run_nests_under_parent_and_env_picks_experiment(
    server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pipeline-42")
    with tracking.stage_run("pipeline", tmp_path) as parent:
        pass
    with (
        tracking.stage_run("sft", tmp_path, parent_run_id=parent.run_id) as child,
        tracking.stage_run("sft-eval", tmp_path) as grandchild,  # nests under the active run
    ):
        pass

    client = mlflow.MlflowClient(server_uri)
    child_run = client.get_run(child.run_id)
    assert child_run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert client.get_run(grandchild.run_id).data.tags["mlflow.parentRunId"] == child.run_id
    assert client.get_experiment(child_run.info.experiment_id).name == "pipeline-42"


@pytest.mark.integration
def test_stage_run_failure_marks_run_failed(server_uri: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="boom"), tracking.stage_run("rlaf", tmp_path) as run:
        raise ValueError("boom")
    assert mlflow.MlflowClient(server_uri).get_run(run.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


@pytest.mark.integration
def test_stage_run_leaves_global_tracking_uri_to_the_env(
    server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tracking.stage_run("registry", tmp_path):
        assert mlflow.get_tracking_uri() == server_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert mlflow.get_tracking_uri() == "http://elsewhere:5000"


def test_unreachable_server_fails_fast_naming_the_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # bound but never listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{probe.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        started = time.monotonic()
        with (
            pytest.raises(tracking.TrackingUnavailable, match=uri),
            tracking.stage_run("bootstrap", tmp_path),
        ):
            pytest.fail("the block must not run")
    assert time.monotonic() - started < 10


@pytest.mark.integration
def test_a_run_injected_by_kfp_is_used(mlflow_server, tmp_path, monkeypatch):
    """KFP's MLflow plugin creates the task's run and passes it as MLFLOW_RUN_ID."""
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.create_experiment(f"kfp-{tmp_path.name}")
    injected = client.create_run(experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_RUN_ID", injected)
    with tracking.stage_run("instructions", tmp_path, {"a": 1}) as run:
        run.log_metrics({"accepted": 3})
    assert run.run_id == injected
    logged = client.get_run(injected)
    assert logged.data.metrics["accepted"] == 3
    assert logged.data.tags["refine_af.stage"] == "instructions"


def test_cached_steps_find_the_parent_by_pipeline_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12 item 9: a step without a parent run id nests under the pipeline run that
    carries the same REFINE_AF_PIPELINE_RUN; another pipeline run's steps do not."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    parents = {}
    for name in ("workflow-a", "workflow-b"):
        monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, name)
        parents[name] = tracking.open_pipeline_run(tmp_path, {"x": 1}, {})
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "workflow-a")
    with tracking.stage_run("instructions", tmp_path) as child:
        pass
    client = tracking.connect(tmp_path)
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parents["workflow-a"]
    assert (
        client.get_run(parents["workflow-b"]).data.tags[tracking.PIPELINE_RUN_TAG] == "workflow-b"
    )
    monkeypatch.delenv(tracking.PIPELINE_RUN_ENV)
    with tracking.stage_run("alone", tmp_path) as alone:
        pass
    assert "mlflow.parentRunId" not in client.get_run(alone.run_id).data.tags
