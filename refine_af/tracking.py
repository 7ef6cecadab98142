"""MLflow helpers: one run per stage, flattened config as params, bounded waits.

Stages use mlflow's fluent API inside ``stage_run`` so that libraries which log to the
active run (transformers' MLflowCallback under trl) land in the stage's run too.

Every wait on the tracking server is bounded by MLflow's own settings, given shorter
defaults here (``WAIT_DEFAULTS``; set the variables to change them). A server lost
mid-stage does not stop the stage: logging stops with one warning, the stage finishes its
outputs, and the stage then fails with ``TrackingUnavailable`` naming the URI.
"""

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import requests
from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from refine_af.errors import TrackingUnavailable

# Names one pipeline run (on a cluster: its Argo workflow, from the pod's label). Cached
# steps find the MLflow parent run by this tag instead of taking its id as an input, which
# would make their cache key change every run.
PIPELINE_RUN_ENV = "REFINE_AF_PIPELINE_RUN"
PIPELINE_RUN_TAG = "refine_af.pipeline_run"
DEFAULT_EXPERIMENT = "refine-af"
# Probe with no retries and a short timeout: mlflow's defaults (7 retries with backoff,
# 120 s timeout) would make a wrong URI look like a hung stage for minutes.
PROBE_TIMEOUT_S = 5
# MLflow's defaults (7 retries, backoff factor 2, 120 s per request) wait up to ~8 minutes
# on a lost server before failing. These bound one call to ~35 s on a silent server and a
# few seconds on a refused connection; an environment that sets the variables wins.
WAIT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
TRUNCATION_MARK = "…[truncated]"
STAGE_TAG = "refine_af.stage"
OUT_DIR_TAG = "refine_af.out_dir"
# What a lost server raises through mlflow's REST client.
_LOST = (MlflowException, requests.exceptions.RequestException, OSError)


def bound_waits() -> None:
    """Apply ``WAIT_DEFAULTS`` to the variables the environment leaves unset."""
    for name, value in WAIT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class _RetryNotice(logging.Handler):
    """Say that MLflow is retrying: urllib3 logs each retry, otherwise silently waited out."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Retrying"):
            _warn(f"tracking server not answering, retrying ({record.getMessage()[:160]})")


_retry_notice = _RetryNotice(logging.WARNING)
logging.getLogger("urllib3.connectionpool").addHandler(_retry_notice)


@dataclass
class StageRun:
    """Handle on a stage's MLflow run; every call targets this run explicitly by id.

    A call that fails because the server is gone disables the handle (one warning) instead
    of stopping the stage; ``lost`` keeps the first error for ``stage_run`` to report.
    """

    run_id: str
    uri: str = ""
    lost: BaseException | None = None

    def _call(self, log: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self.lost is not None:
            return
        try:
            log(*args, **kwargs)
        except _LOST as error:
            self.lost = error
            _warn(
                f"MLflow tracking at {self.uri} stopped answering ({_first_line(error)}); "
                "the stage continues without tracking and will exit 1 when its outputs are written"
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._call(mlflow.log_metrics, dict(metrics), step=step, run_id=self.run_id)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._call(mlflow.log_artifact, str(path), artifact_path=artifact_path, run_id=self.run_id)

    def log_dict(self, obj: dict[str, Any], name: str) -> None:
        """``name`` ends in .json or .yaml; mlflow picks the format from it."""
        self._call(mlflow.log_dict, obj, name, run_id=self.run_id)

    def log_text(self, text: str, name: str) -> None:
        self._call(mlflow.log_text, text, name, run_id=self.run_id)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


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
        except _LOST as error:
            raise TrackingUnavailable(
                f"MLflow tracking at {uri} is unreachable ({_first_line(error)}); start the "
                "server or set MLFLOW_TRACKING_URI to a reachable one"
            ) from error


@contextlib.contextmanager
def _store_setup(uri: str, workspace: Path) -> Iterator[None]:
    """Serialise the first use of a local sqlite store: two processes creating it at once
    race on its schema migration (``duplicate column name``)."""
    if not uri.startswith("sqlite:"):
        yield
        return
    Path(workspace).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(workspace) / ".mlflow.db.lock"), timeout=120):
        yield


def connect(workspace: Path) -> mlflow.MlflowClient:
    """A client of the tracking store and model registry, checked to be reachable first.

    The registry is the tracking store unless ``MLFLOW_REGISTRY_URI`` says otherwise.
    """
    bound_waits()
    uri = tracking_uri(workspace)
    with _store_setup(uri, workspace):
        client = mlflow.MlflowClient(tracking_uri=uri)
        _require_reachable(client, uri)
    return client


def _end_abandoned_runs(
    client: mlflow.MlflowClient, experiment_id: str, stage_name: str, out_dir: str
) -> None:
    """Mark KILLED the runs of this stage and output folder still RUNNING.

    The caller holds the folder's lock, so a run still RUNNING there was killed before it
    could end itself.
    """
    current = os.environ.get("MLFLOW_RUN_ID")
    escaped = out_dir.replace("'", "\\'")
    abandoned = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{OUT_DIR_TAG}` = '{escaped}' and tags.`{STAGE_TAG}` = "
        f"'{stage_name}' and attributes.status = 'RUNNING'",
    )
    for run in abandoned:
        if run.info.run_id != current:
            client.set_terminated(run.info.run_id, status="KILLED")
            _warn(f"MLflow run {run.info.run_id} of an earlier {stage_name} run in {out_dir} "
                  "never ended (killed?); marked KILLED")  # fmt: skip


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
    out_dir: str | os.PathLike[str] | None = None,
) -> Iterator[StageRun]:
    """Run the block inside an MLflow run named after the stage; yield a ``StageRun``.

    The tracking URI comes from ``tracking_uri(workspace)`` and the experiment from
    ``MLFLOW_EXPERIMENT_NAME`` or ``experiment``. With ``parent_run_id`` (e.g. the
    pipeline's run, started in another process) the run is nested under it; inside an
    active run it nests under that one. ``params`` are logged flattened. The run ends
    FINISHED, or FAILED if the block raises. Without ``parent_run_id``, the pipeline run
    tagged with ``REFINE_AF_PIPELINE_RUN`` (a cached step's parent) is the parent. Raises
    ``TrackingUnavailable`` before starting if the store cannot be reached, and after the
    block if it was lost on the way. Under KFP's MLflow plugin, which creates a nested run
    per task and injects ``MLFLOW_RUN_ID``, the stage logs into that run. With ``out_dir``
    (a folder the caller holds the lock of) the run is tagged with it, and runs of the same
    stage and folder left RUNNING by a killed process are marked KILLED.
    """
    bound_waits()
    uri = tracking_uri(workspace)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
    folder = str(Path(out_dir).resolve()) if out_dir is not None else None
    with _store_setup(uri, workspace):
        client = mlflow.MlflowClient(tracking_uri=uri)
        _require_reachable(client, uri)
        experiment_id = _experiment_id(client, name, _artifact_root(uri, workspace, name))
    parent_run_id = parent_run_id or pipeline_parent(client) or None
    if folder is not None:
        _end_abandoned_runs(client, experiment_id, stage_name, folder)
    with _using_tracking_uri(uri):
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=stage_name,
            nested=mlflow.active_run() is not None,
            parent_run_id=parent_run_id,
        )
        handle = StageRun(run.info.run_id, uri)
        status = "FAILED"
        try:
            # Set after the start: a run KFP's MLflow plugin created (MLFLOW_RUN_ID) is
            # resumed as it is, and start_run ignores tags for a resumed run.
            run_tags = {STAGE_TAG: stage_name, **(tags or {})}
            if folder is not None:
                run_tags[OUT_DIR_TAG] = folder
            handle._call(mlflow.set_tags, run_tags)
            if params:
                handle._call(mlflow.log_params, flatten(params), run_id=run.info.run_id)
            yield handle
            status = "FINISHED"
        finally:
            _end_run(handle, status)
    if handle.lost is not None:
        raise TrackingUnavailable(
            f"MLflow tracking at {uri} stopped answering during stage {stage_name} "
            f"({_first_line(handle.lost)}); the stage's outputs are complete, its MLflow run "
            f"{handle.run_id} is not"
        )


def _end_run(handle: StageRun, status: str) -> None:
    """End the active run. ``mlflow.end_run`` takes it off the local stack before it tells
    the server, so a lost server costs one short attempt here, not another retry cycle."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    with _environ(**quick) if handle.lost is not None else contextlib.nullcontext():
        try:
            mlflow.end_run(status)
        except _LOST as error:
            handle.lost = handle.lost or error


def pipeline_parent(client: mlflow.MlflowClient) -> str | None:
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
