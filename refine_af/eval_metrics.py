"""Stage 5's figures as flat MLflow metrics: a model's scores, and a comparison's deltas.

Task and category names become parts of metric keys; characters MLflow refuses in a key
are replaced by ``_``.
"""

from __future__ import annotations

import re

from refine_af.comparison import Comparison
from refine_af.superni import EvaluationResult

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def of_result(result: EvaluationResult, prefix: str) -> dict[str, float]:
    metrics = {
        f"{prefix}.rougeL": result.rougeL,
        f"{prefix}.rougeL_instances": result.rougeL_instances,
        f"{prefix}.truncated": float(result.truncated),
    }
    for task, scores in result.tasks.items():
        metrics[f"{prefix}.task.{_UNSAFE.sub('_', task)}"] = scores.rougeL
    for category, score in result.categories.items():
        metrics[f"{prefix}.category.{_UNSAFE.sub('_', category)}"] = score
    return metrics


def of_comparison(c: Comparison) -> dict[str, float]:
    return {
        "pct_tasks_improved": c.pct_improved,
        "pct_tasks_worse": c.pct_worse,
        "pct_tasks_tied": c.pct_ties,
        "tasks_improved": float(c.improved),
        "tasks_worse": float(c.worse),
        "tasks_tied": float(c.ties),
        "mean_delta": c.mean_delta,
        "mean_delta_ci_low": c.ci_low,
        "mean_delta_ci_high": c.ci_high,
    }
