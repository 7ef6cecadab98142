"""Paired comparison of two SuperNI evaluations: the paper's "% of tasks improved".

The unit is the task: both models are scored on the same instances of the same tasks, a
task counts as improved, worse or tied by its mean ROUGE-L, and the mean per-task delta
gets a 95% interval from a paired bootstrap over tasks (seeded, so a report reproduces).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from refine_af.errors import InputError
from refine_af.superni import EvaluationResult

Outcome = Literal["improved", "worse", "tie"]
CI_LEVEL = 0.95


class TaskDelta(BaseModel):
    task: str
    category: str | None
    candidate: float
    baseline: float
    delta: float
    outcome: Outcome


class CategoryDelta(BaseModel):
    candidate: float
    baseline: float
    delta: float


class Comparison(BaseModel):
    """Candidate minus baseline, per task and overall; ROUGE-L on a 0–100 scale."""

    model_config = ConfigDict(extra="forbid")

    candidate: str
    baseline: str
    tasks: int
    instances: int
    improved: int
    worse: int
    ties: int
    pct_improved: float
    pct_worse: float
    pct_ties: float
    candidate_rougeL: float
    baseline_rougeL: float
    mean_delta: float
    ci_low: float
    ci_high: float
    ci_level: float = CI_LEVEL
    bootstrap_samples: int
    seed: int
    tie_tolerance: float
    setting_differences: dict[str, list] = {}
    categories: dict[str, CategoryDelta] = {}
    per_task: list[TaskDelta]


def paired_bootstrap_ci(
    deltas: np.ndarray, samples: int, seed: int, level: float = CI_LEVEL
) -> tuple[float, float]:
    """Percentile interval of the mean paired delta, resampling tasks with replacement."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(deltas), size=(samples, len(deltas)))
    means = deltas[picks].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def check_comparable(candidate: EvaluationResult, baseline: EvaluationResult) -> None:
    """Both results must cover the same instances of the same tasks, or deltas mean nothing."""
    ours, theirs = set(candidate.tasks), set(baseline.tasks)
    if ours != theirs:
        only_c = ", ".join(sorted(ours - theirs)[:5]) or "-"
        only_b = ", ".join(sorted(theirs - ours)[:5]) or "-"
        raise InputError(
            f"{candidate.model} and {baseline.model} were evaluated on different tasks "
            f"(only the first: {only_c}; only the second: {only_b}); evaluate both with the "
            "same stage5 data, tasks, per_task and seed"
        )
    for task in sorted(ours):
        if candidate.tasks[task].ids_sha256 != baseline.tasks[task].ids_sha256:
            raise InputError(
                f"{candidate.model} and {baseline.model} were evaluated on different "
                f"instances of {task}; evaluate both with the same stage5 data and per_task"
            )


def _setting_differences(
    candidate: EvaluationResult, baseline: EvaluationResult
) -> dict[str, list]:
    """Generation settings that differ: allowed, but the report must say so."""
    keys = sorted(set(candidate.settings) | set(baseline.settings))
    return {
        key: [candidate.settings.get(key), baseline.settings.get(key)]
        for key in keys
        if candidate.settings.get(key) != baseline.settings.get(key)
    }


def _outcome(delta: float, tolerance: float) -> Outcome:
    if delta > tolerance:
        return "improved"
    if delta < -tolerance:
        return "worse"
    return "tie"


def compare(
    candidate: EvaluationResult,
    baseline: EvaluationResult,
    *,
    tie_tolerance: float,
    bootstrap_samples: int,
    seed: int,
) -> Comparison:
    """Per-task deltas, counts of improved/worse/tied tasks and the bootstrap interval."""
    check_comparable(candidate, baseline)
    per_task = []
    for task, ours in candidate.tasks.items():
        delta = ours.rougeL - baseline.tasks[task].rougeL
        per_task.append(
            TaskDelta(
                task=task,
                category=ours.category,
                candidate=ours.rougeL,
                baseline=baseline.tasks[task].rougeL,
                delta=delta,
                outcome=_outcome(delta, tie_tolerance),
            )
        )
    per_task.sort(key=lambda row: (-row.delta, row.task))
    deltas = np.array([row.delta for row in per_task])
    low, high = paired_bootstrap_ci(deltas, bootstrap_samples, seed)
    counts = {kind: sum(row.outcome == kind for row in per_task) for kind in ("improved", "worse")}
    n = len(per_task)
    ties = n - counts["improved"] - counts["worse"]
    return Comparison(
        candidate=candidate.model,
        baseline=baseline.model,
        tasks=n,
        instances=candidate.instances,
        improved=counts["improved"],
        worse=counts["worse"],
        ties=ties,
        pct_improved=100.0 * counts["improved"] / n,
        pct_worse=100.0 * counts["worse"] / n,
        pct_ties=100.0 * ties / n,
        candidate_rougeL=candidate.rougeL,
        baseline_rougeL=baseline.rougeL,
        mean_delta=float(deltas.mean()),
        ci_low=low,
        ci_high=high,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
        tie_tolerance=tie_tolerance,
        setting_differences=_setting_differences(candidate, baseline),
        categories={
            name: CategoryDelta(
                candidate=score,
                baseline=baseline.categories[name],
                delta=score - baseline.categories[name],
            )
            for name, score in candidate.categories.items()
            if name in baseline.categories
        },
        per_task=per_task,
    )
