"""MLflow helpers: one run per stage, flattened config as params, fail fast if unreachable.

Stages use mlflow's fluent API inside ``stage_run`` so that libraries which log to the
active run (transformers' MLflowCallback under trl) land in the stage's run too.
"""

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from refine_af.errors import TrackingUnavailable

PARENT_RUN_ENV = "REFINE_AF_PARENT_RUN_ID"
# Names one pipeline run (on a cluster: its Argo workflow, from the pod's label). Cached
# steps find the MLflow parent run by this tag instead of taking its id as an input, which
# would make their cache key change every run.
PIPELINE_RUN_ENV = "REFINE_AF_PIPELINE_RUN"
PIPELINE_RUN_TAG = "refine_af.pipeline_run"
DEFAULT_EXPERIMENT = "refine-af"
# Probe with no retries and a short timeout: mlflow's defaults (7 retries with backoff,
# 120 s timeout) would make a wrong URI look like a hung stage for minutes.
PROBE_TIMEOUT_S = 5
TRUNCATION_MARK = "…[truncated]"


@dataclass(frozen=True)
class StageRun:
    """Handle on a stage's MLflow run; every call targets this run explicitly by id."""

    run_id: str

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        mlflow.log_metrics(dict(metrics), step=step, run_id=self.run_id)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path, run_id=self.run_id)

    def log_dict(self, obj: dict[str, Any], name: str) -> None:
        """``name`` ends in .json or .yaml; mlflow picks the format from it."""
        mlflow.log_dict(obj, name, run_id=self.run_id)

    def log_text(self, text: str, name: str) -> None:
        mlflow.log_text(text, name, run_id=self.run_id)


def tracking_uri(workspace: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite store in the workspace (local runs)."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    return f"sqlite:///{Path(workspace).resolve() / 'mlflow.db'}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → ``{"a.b.c": "value"}``, the flat string params MLflow stores.

    Values longer than MLflow's limit (6000 chars) are truncated with a visible mark,
    because MLflow rejects the whole batch otherwise.
    """
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = _param_value(value)
    return flat


def _param_value(value: Any) -> str:
    text = str(value)
    if len(text) <= MAX_PARAM_VAL_LENGTH:
        return text
    return text[: MAX_PARAM_VAL_LENGTH - len(TRUNCATION_MARK)] + TRUNCATION_MARK


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the block, then restore what was there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous


@contextlib.contextmanager
def _using_tracking_uri(uri: str) -> Iterator[None]:
    """Point mlflow's fluent API at ``uri`` for the block, then restore the previous state.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``, so both the global
    and the variable are restored. A global equal to the variable is restored as unset, so
    that a later change of the variable still takes effect.
    """
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    current = mlflow.get_tracking_uri()
    explicit = mlflow.tracking.is_tracking_uri_set() and current != saved_env
    previous = current if explicit else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if saved_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _require_reachable(client: mlflow.MlflowClient, uri: str) -> None:
    """Fail in seconds, naming the URI, when the tracking store cannot be used."""
    with _environ(
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(PROBE_TIMEOUT_S)
    ):
        try:
            client.search_experiments(max_results=1)
        except (MlflowException, OSError) as error:
            raise TrackingUnavailable(
                f"MLflow tracking at {uri} is unreachable ({error}); start the server or "
                "set MLFLOW_TRACKING_URI to a reachable one"
            ) from error


def connect(workspace: Path) -> mlflow.MlflowClient:
    """A client of the tracking store and model registry, checked to be reachable first.

    The registry is the tracking store unless ``MLFLOW_REGISTRY_URI`` says otherwise.
    """
    uri = tracking_uri(workspace)
    if uri.startswith("sqlite:"):
        Path(workspace).mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    _require_reachable(client, uri)
    return client


def _experiment_id(client: mlflow.MlflowClient, name: str, artifact_root: str | None) -> str:
    """Get or create the experiment without making it mlflow's global active experiment."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)  # a concurrent stage created it
    return experiment.experiment_id


def _artifact_root(uri: str, workspace: Path, experiment: str) -> str | None:
    """Artifacts of a local sqlite store go to the workspace, not ``./mlruns`` in the cwd.

    A tracking server decides its own artifact root (proxied, or S3), hence None.
    """
    if not uri.startswith("sqlite:"):
        return None
    return (Path(workspace).resolve() / "mlartifacts" / experiment).as_uri()


@contextlib.contextmanager
def stage_run(
    stage_name: str,
    workspace: Path,
    params: Mapping[str, Any] | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[StageRun]:
    """Run the block inside an MLflow run named after the stage; yield a ``StageRun``.

    The tracking URI comes from ``tracking_uri(workspace)`` and the experiment from
    ``MLFLOW_EXPERIMENT_NAME`` or ``experiment``. With ``parent_run_id`` (e.g. the
    pipeline's run, started in another process) the run is nested under it; inside an
    active run it nests under that one. ``params`` are logged flattened. The run ends
    FINISHED, or FAILED if the block raises. Without ``parent_run_id``, the pipeline's run
    in ``REFINE_AF_PARENT_RUN_ID`` (set by the components) is the parent. Raises
    ``TrackingUnavailable`` before starting if the store cannot be reached. Under KFP's
    MLflow plugin, which creates a nested run per task and injects ``MLFLOW_RUN_ID``, the
    stage logs into that run.
    """
    uri = tracking_uri(workspace)
    if uri.startswith("sqlite:"):
        Path(workspace).mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    _require_reachable(client, uri)
    parent_run_id = (
        parent_run_id or os.environ.get(PARENT_RUN_ENV) or _pipeline_parent(client) or None
    )
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
    experiment_id = _experiment_id(client, name, _artifact_root(uri, workspace, name))
    with (
        _using_tracking_uri(uri),
        mlflow.start_run(
            experiment_id=experiment_id,
            run_name=stage_name,
            nested=mlflow.active_run() is not None,
            parent_run_id=parent_run_id,
        ) as run,
    ):
        # Set after the start: a run KFP's MLflow plugin created (MLFLOW_RUN_ID) is resumed
        # as it is, and start_run ignores tags for a resumed run.
        mlflow.set_tags({"refine_af.stage": stage_name, **(tags or {})})
        if params:
            mlflow.log_params(flatten(params), run_id=run.info.run_id)
        yield StageRun(run.info.run_id)


def _pipeline_parent(client: mlflow.MlflowClient) -> str | None:
    """The parent run ``open_pipeline_run`` tagged with this pipeline run's name, if any."""
    name = os.environ.get(PIPELINE_RUN_ENV)
    if not name:
        return None
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{name}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def open_pipeline_run(workspace: Path, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    """Create the parent run of one pipeline run; returns its id ("" under KFP's plugin).

    Stages nest under it by tag, so it is closed at once: a pipeline that stops half-way
    leaves no run stuck RUNNING. KFP's MLflow plugin makes its own parent run and injects
    ``MLFLOW_RUN_ID`` into every task; then the hierarchy is the plugin's.
    """
    if os.environ.get("MLFLOW_RUN_ID"):
        return ""
    pipeline_run = os.environ.get(PIPELINE_RUN_ENV)
    tags = {**tags, PIPELINE_RUN_TAG: pipeline_run} if pipeline_run else tags
    with stage_run("pipeline", workspace, params, tags=tags) as run:
        return run.run_id


def log_to_run(
    workspace: Path,
    run_id: str,
    metrics: Mapping[str, float],
    tags: Mapping[str, str] | None = None,
) -> None:
    """Add final figures (and tags: the promotion decision) to an earlier run."""
    client = connect(workspace)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
