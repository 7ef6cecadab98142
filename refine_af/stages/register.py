"""Stage 6: evaluated model versions in the MLflow registry, and the gated promotion.

Aliases, not stages (MLflow ≥ 2.9): an evaluated version gets ``challenger``, the run's
no-RL baseline is a version of the same registered model with the ``baseline`` alias (and
``refine_af.policy=base``), and ``promote`` moves ``champion`` to the challenger only when
it passes the gate against its own baseline and, when there is one, against the current
champion, on the same SuperNI instances. With neither there is nothing to beat, and the
challenger is rejected unless forced. The evaluation figures, both comparisons, the gate
and the decision are version tags, so the registry alone explains why a version is or is
not champion. How a version was created (mlflow.transformers, plain artifacts) does not
matter here: only its version number and tags do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from refine_af import comparison
from refine_af.comparison import Comparison
from refine_af.config import EvaluationSettings, RegistrySettings
from refine_af.errors import InputError
from refine_af.gate import PROMOTION, Decision, check_gate, promotion_tags
from refine_af.registry import (
    EVAL,
    EVAL_ARTIFACT_TAG,
    EVAL_RUN_TAG,
    load_evaluation,
    missing,
    require_model,
    require_version,
)
from refine_af.superni import EvaluationResult

CHALLENGER, CHAMPION, BASELINE = "challenger", "champion", "baseline"
BASELINE_VERSION_TAG = f"{EVAL}baseline_version"
POLICY_TAG = "refine_af.policy"

NOTHING_TO_BEAT = (
    "nothing to beat: no baseline was evaluated with this version (run_baseline=false) "
    "and there is no champion; override with `refine-af promote --force --reason …`"
)


@dataclass(frozen=True)
class Promotion:
    """What ``promote`` decided, against which champion, and why."""

    model_name: str
    version: str
    champion_before: str | None
    decision: Decision
    reasons: list[str]
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    """opponent ("baseline", "champion") → the challenger's comparison with it"""
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def rejected(self) -> bool:
        return self.decision == "rejected"

    @property
    def summary(self) -> str:
        """The decision and why: the unmet conditions when rejected, all of them otherwise."""
        return self.tags.get(f"{PROMOTION}summary", f"{self.decision}: {'; '.join(self.reasons)}")


# ---------------------------------------------------------------- challenger


def evaluation_tags(result: EvaluationResult) -> dict[str, str]:
    """Version tags that tie a version to its evaluation and show its figures."""
    if not result.mlflow_run_id or not result.mlflow_artifact:
        raise InputError(
            f"the evaluation of {result.model} has no MLflow run; "
            "produce it with `refine-af stage evaluate`"
        )
    return {
        EVAL_RUN_TAG: result.mlflow_run_id,
        EVAL_ARTIFACT_TAG: result.mlflow_artifact,
        f"{EVAL}model": result.model,
        f"{EVAL}data": result.data,
        f"{EVAL}rougeL": f"{result.rougeL:.4f}",
        f"{EVAL}rougeL_instances": f"{result.rougeL_instances:.4f}",
        f"{EVAL}tasks": str(len(result.tasks)),
        f"{EVAL}instances": str(result.instances),
    }


def _require_eval_run(client: mlflow.MlflowClient, tags: dict[str, str]) -> None:
    try:
        client.get_run(tags[EVAL_RUN_TAG])
    except MlflowException as error:
        if not missing(error):
            raise
        raise InputError(
            f"the evaluation run {tags[EVAL_RUN_TAG]} is not in the tracking store at "
            f"{client.tracking_uri}; evaluate with this store so promote can read it"
        ) from error


def mark_challenger(
    client: mlflow.MlflowClient,
    model_name: str,
    version: str,
    evaluation: EvaluationResult,
    baseline_version: str | None = None,
) -> dict[str, str]:
    """Tag ``version`` with its evaluation and point the ``challenger`` alias at it.

    ``baseline_version``: the run's no-RL baseline, registered and evaluated on the same
    instances; promote gates the challenger against it.
    """
    model_version = require_version(client, model_name, version)
    if baseline_version is not None:
        require_version(client, model_name, baseline_version)
        if str(baseline_version) == str(version):
            raise InputError(f"version {version} cannot be its own baseline")
    tags = evaluation_tags(evaluation)
    if baseline_version is not None:
        tags[BASELINE_VERSION_TAG] = str(baseline_version)
    _require_eval_run(client, tags)
    _write_tags(client, model_version, tags, prefix=EVAL)
    client.set_registered_model_alias(model_name, CHALLENGER, str(version))
    return tags


def mark_baseline(
    client: mlflow.MlflowClient, model_name: str, version: str, evaluation: EvaluationResult
) -> dict[str, str]:
    """Tag the run's no-RL baseline ``version`` with its evaluation; alias ``baseline``.

    The alias follows the latest run's baseline; each challenger names its own baseline
    version in ``refine_af.eval.baseline_version``, so older runs stay explained.
    """
    model_version = require_version(client, model_name, version)
    tags = evaluation_tags(evaluation)
    _require_eval_run(client, tags)
    _write_tags(client, model_version, tags, prefix=EVAL)
    client.set_registered_model_alias(model_name, BASELINE, str(version))
    return tags


def mark_evaluated(
    client: mlflow.MlflowClient,
    model_name: str,
    version: str,
    candidate: EvaluationResult,
    baseline_version: str | None = None,
    baseline: EvaluationResult | None = None,
) -> None:
    """Stage 5's post-step: the run's baseline (when there is one) gets its scores and the
    ``baseline`` alias, then ``version`` its scores and the ``challenger`` alias."""
    if baseline_version is not None:
        if baseline is None:
            raise InputError(f"baseline version {baseline_version} was not evaluated")
        mark_baseline(client, model_name, baseline_version, baseline)
    mark_challenger(client, model_name, version, candidate, baseline_version)


# ---------------------------------------------------------------- promotion


def _write_tags(
    client: mlflow.MlflowClient, model_version: ModelVersion, tags: dict[str, str], prefix: str
) -> None:
    """Make the ``prefix`` tags exactly ``tags``, writing only what changes (idempotent)."""
    name, version = model_version.name, model_version.version
    for key in sorted(k for k in model_version.tags if k.startswith(prefix) and k not in tags):
        client.delete_model_version_tag(name, version, key)
    for key, value in tags.items():
        if model_version.tags.get(key) != value:
            client.set_model_version_tag(name, version, key, value)


def _opponents(model_version: ModelVersion, champion: str | None, version: str) -> dict[str, str]:
    """Who the challenger must beat: its run's baseline (if evaluated) and the champion."""
    opponents = {}
    if baseline := model_version.tags.get(BASELINE_VERSION_TAG):
        opponents[BASELINE] = baseline
    if champion is not None and champion != str(version):
        opponents[CHAMPION] = champion
    return opponents


def promote(
    client: mlflow.MlflowClient,
    model_name: str,
    version: str | None,
    gate: RegistrySettings,
    evaluation: EvaluationSettings,
    *,
    force: bool = False,
    reason: str | None = None,
) -> Promotion:
    """Move ``champion`` to ``version`` (default: the challenger) if it passes the gate.

    The gate compares the version's evaluation task by task with its run's no-RL baseline
    (``refine_af.eval.baseline_version``) and with the champion's, and must pass against
    each. With neither there is nothing to beat: rejected. ``force`` promotes regardless
    and records ``reason``. The decision, the comparisons and the gate become version tags;
    promoting the champion again changes nothing. Everything is read and checked before
    the first write.
    """
    if force and not (reason and reason.strip()):
        raise InputError("--force needs --reason: say why the gate is overridden")
    if reason and not force:
        raise InputError("--reason is recorded only with --force")
    aliases = require_model(client, model_name)
    if version is None:
        if CHALLENGER not in aliases:
            raise InputError(
                f"registered model {model_name!r} has no {CHALLENGER!r} alias; evaluate a "
                "version with `refine-af stage evaluate --version N` or pass --version"
            )
        version = aliases[CHALLENGER]
    model_version = require_version(client, model_name, version)
    champion = aliases.get(CHAMPION)
    if champion == str(version):
        return Promotion(
            model_name, str(version), champion, "unchanged", [f"version {version} is champion"]
        )
    if model_version.tags.get(POLICY_TAG) == "base" and not force:
        raise InputError(
            f"version {version} is a no-RL baseline ({POLICY_TAG}=base): it is what a "
            "challenger is measured against, not a candidate; promote it with --force --reason"
        )

    opponents = _opponents(model_version, champion, str(version))
    comparisons: dict[str, Comparison] = {}
    reasons: list[str] = []
    try:
        challenger_eval = load_evaluation(client, model_version)
        for opponent, opponent_version in opponents.items():
            opponent_eval = load_evaluation(
                client, require_version(client, model_name, opponent_version)
            )
            comparisons[opponent] = comparison.compare(
                challenger_eval,
                opponent_eval,
                tie_tolerance=evaluation.tie_tolerance,
                bootstrap_samples=evaluation.bootstrap_samples,
                seed=evaluation.seed,
            )
    except InputError as error:
        if not force:
            raise
        reasons.append(f"no comparison: {error}")
    unmet: list[str] = []
    for opponent, compared in comparisons.items():
        for met, why in check_gate(compared, gate, f"{opponent} v{opponents[opponent]}"):
            reasons.append(why)
            if not met:
                unmet.append(why)
    if not opponents:
        unmet.append(NOTHING_TO_BEAT)
        reasons.append(NOTHING_TO_BEAT)
    if force:
        decision: Decision = "forced"
        reasons.insert(0, f"forced: {reason.strip()}")
    elif not unmet and len(comparisons) == len(opponents):
        decision = "promoted"
    else:
        decision = "rejected"
    headline = "; ".join(unmet if decision == "rejected" else reasons)
    tags = promotion_tags(decision, reasons, opponents, comparisons, gate)
    tags[f"{PROMOTION}summary"] = f"{decision}: {headline}"
    tags[f"{PROMOTION}eval_run_id"] = model_version.tags.get(EVAL_RUN_TAG, "none")
    if decision != "rejected":
        tags[f"{PROMOTION}time"] = datetime.now(UTC).isoformat(timespec="seconds")
    _write_tags(client, model_version, tags, prefix=PROMOTION)
    if decision != "rejected":
        client.set_registered_model_alias(model_name, CHAMPION, str(version))
    return Promotion(model_name, str(version), champion, decision, reasons, comparisons, tags)
