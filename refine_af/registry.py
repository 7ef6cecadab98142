"""Reading the MLflow model registry: a registered model, a version, its evaluation.

A name or version that is not there is bad input (InputError naming the registry); any
other registry failure propagates.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from refine_af import superni
from refine_af.errors import InputError
from refine_af.superni import EvaluationResult

EVAL = "refine_af.eval."
EVAL_RUN_TAG, EVAL_ARTIFACT_TAG = f"{EVAL}run_id", f"{EVAL}artifact"


def missing(error: MlflowException) -> bool:
    """Whether the registry said "no such model, version or run" (not an outage)."""
    return error.error_code in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}


def require_model(client: mlflow.MlflowClient, name: str) -> dict[str, str]:
    """The registered model's aliases (alias → version); a missing model is bad input."""
    try:
        registered = client.get_registered_model(name)
    except MlflowException as error:
        if missing(error):
            raise InputError(
                f"no registered model {name!r} in the registry at {client.tracking_uri}"
            ) from error
        raise
    return {alias: str(version) for alias, version in registered.aliases.items()}


def require_version(client: mlflow.MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as error:
        if missing(error):
            raise InputError(
                f"registered model {name!r} has no version {version} "
                f"in the registry at {client.tracking_uri}"
            ) from error
        raise


def load_evaluation(client: mlflow.MlflowClient, model_version: ModelVersion) -> EvaluationResult:
    """The stage 5 result a version was marked challenger with (from its evaluation run)."""
    run_id = model_version.tags.get(EVAL_RUN_TAG)
    artifact = model_version.tags.get(EVAL_ARTIFACT_TAG)
    if not run_id or not artifact:
        raise InputError(
            f"version {model_version.version} of {model_version.name!r} has no evaluation; "
            f"run `refine-af stage evaluate --version {model_version.version}` first"
        )
    origin = f"runs:/{run_id}/{artifact}"
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = client.download_artifacts(run_id, artifact, scratch)
        except (MlflowException, OSError) as error:
            raise InputError(
                f"version {model_version.version}: evaluation {origin} cannot be read ({error})"
            ) from error
        return superni.parse_result(Path(local).read_text(), origin)


@dataclass(frozen=True)
class VersionSummary:
    """One row of ``refine-af models list``."""

    version: str
    aliases: list[str]
    created: datetime
    source: str
    tags: dict[str, str]


def list_versions(client: mlflow.MlflowClient, model_name: str) -> list[VersionSummary]:
    """Every version of the model, newest first, with its aliases and refine-af tags."""
    aliases = require_model(client, model_name)
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)
    versions = client.search_model_versions(f"name = '{model_name}'")
    return [
        VersionSummary(
            version=str(v.version),
            aliases=by_version.get(str(v.version), []),
            created=datetime.fromtimestamp(v.creation_timestamp / 1000, UTC),
            source=v.source,
            tags={k: val for k, val in v.tags.items() if k.startswith("refine_af.")},
        )
        for v in sorted(versions, key=lambda v: int(v.version), reverse=True)
    ]
