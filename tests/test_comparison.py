"""comparison and report: counts, ties, the paired bootstrap, the markdown and the chart."""

from pathlib import Path

import numpy as np
import pytest

from refine_af import comparison, report
from refine_af.errors import InputError
from refine_af.superni import EvaluationResult, TaskResult


def result(model: str, scores: dict[str, float], **settings: object) -> EvaluationResult:
    tasks = {t: TaskResult(rougeL=s, instances=5, ids_sha256=f"ids-{t}") for t, s in scores.items()}
    mean = sum(scores.values()) / len(scores)
    return EvaluationResult(
        model=model, data="d", rougeL=mean, rougeL_instances=mean, tasks=tasks, settings=settings
    )


def compare(candidate: EvaluationResult, baseline: EvaluationResult, tolerance: float = 0.0):
    return comparison.compare(
        candidate, baseline, tie_tolerance=tolerance, bootstrap_samples=2000, seed=3
    )


def test_counts_improved_worse_and_ties() -> None:
    candidate = result("c", {"a": 50.0, "b": 20.0, "c": 30.0, "d": 10.05})
    baseline = result("b", {"a": 40.0, "b": 25.0, "c": 30.0, "d": 10.0})
    c = compare(candidate, baseline)
    assert (c.improved, c.worse, c.ties) == (2, 1, 1)
    assert c.pct_improved == 50.0
    assert c.mean_delta == pytest.approx((10 - 5 + 0 + 0.05) / 4)
    assert c.mean_delta == pytest.approx(c.candidate_rougeL - c.baseline_rougeL)
    assert [row.task for row in c.per_task] == ["a", "d", "c", "b"]  # best first
    tolerant = compare(candidate, baseline, tolerance=0.1)
    assert (tolerant.improved, tolerant.ties) == (1, 2)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    deltas = np.array([1.0, -2.0, 3.0, 0.5, 4.0, -1.0, 2.0])
    low, high = comparison.paired_bootstrap_ci(deltas, 5000, seed=1)
    assert (low, high) == comparison.paired_bootstrap_ci(deltas, 5000, seed=1)
    assert low < deltas.mean() < high
    assert comparison.paired_bootstrap_ci(np.zeros(4), 500, seed=1) == (0.0, 0.0)


def test_different_tasks_or_instances_cannot_be_compared() -> None:
    with pytest.raises(InputError, match="different tasks"):
        compare(result("c", {"a": 1.0}), result("b", {"a": 1.0, "x": 2.0}))
    other = result("b", {"a": 1.0})
    other.tasks["a"].ids_sha256 = "other"
    with pytest.raises(InputError, match="different instances of a"):
        compare(result("c", {"a": 1.0}), other)


def test_report_markdown_and_chart(tmp_path: Path) -> None:
    candidate = result("cand", {"a": 50.0, "b": 20.0}, max_new_tokens=64)
    baseline = result("base", {"a": 40.0, "b": 25.0}, max_new_tokens=128)
    c = compare(candidate, baseline)
    markdown = report.comparison_markdown(c)
    assert "| tasks improved | **1 (50.0%)** |" in markdown
    assert "| a | 50.00 | 40.00 | +10.00 | improved |" in markdown
    assert "`max_new_tokens`: 64 vs 128" in markdown  # differing settings are called out
    assert "| a | 5 | 50.00 |" in report.evaluation_markdown(candidate)
    chart = tmp_path / "deltas.png"
    report.plot_deltas(c, chart)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["deltas.png"]
