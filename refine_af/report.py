"""Human-readable stage 5 reports: a markdown summary and a bar chart of per-task deltas.

The markdown is self-contained (it also becomes a KFP Markdown artifact); the chart shows
at a glance how many tasks moved which way and by how much.
"""

from __future__ import annotations

from pathlib import Path

from refine_af import storage
from refine_af.comparison import Comparison
from refine_af.superni import EvaluationResult

_COLOURS = {"improved": "#2e7d32", "worse": "#c62828", "tie": "#9e9e9e"}


def _f(value: float) -> str:
    return f"{value:.2f}"


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def evaluation_markdown(result: EvaluationResult) -> str:
    """Scores of one model: overall, per category (when known) and per task."""
    lines = [
        f"# SuperNI evaluation: `{result.model}`",
        "",
        f"- ROUGE-L (mean over {len(result.tasks)} tasks): **{_f(result.rougeL)}**",
        f"- ROUGE-L (mean over {result.instances} instances, the official overall): "
        f"{_f(result.rougeL_instances)}",
        f"- outputs cut by the token limit: {result.truncated}",
        f"- data: `{result.data}`",
        "",
    ]
    if result.categories:
        lines += ["| category | ROUGE-L |", "|---|---:|"]
        lines += [f"| {name} | {_f(score)} |" for name, score in sorted(result.categories.items())]
        lines.append("")
    lines += ["| task | instances | ROUGE-L |", "|---|---:|---:|"]
    lines += [
        f"| {task} | {scores.instances} | {_f(scores.rougeL)} |"
        for task, scores in sorted(result.tasks.items(), key=lambda kv: -kv[1].rougeL)
    ]
    return "\n".join(lines) + "\n"


def comparison_markdown(comparison: Comparison) -> str:
    """The paper's comparison: % of tasks improved, ties, mean delta with its interval."""
    c = comparison
    level = f"{c.ci_level:.0%}"
    lines = [
        "# SuperNI comparison",
        "",
        f"- candidate: `{c.candidate}`",
        f"- baseline: `{c.baseline}`",
        f"- {c.tasks} tasks, {c.instances} instances per model",
        "",
        "| | value |",
        "|---|---:|",
        f"| tasks improved | **{c.improved} ({c.pct_improved:.1f}%)** |",
        f"| tasks tied (abs(delta) ≤ {c.tie_tolerance:g}) | {c.ties} ({c.pct_ties:.1f}%) |",
        f"| tasks worse | {c.worse} ({c.pct_worse:.1f}%) |",
        f"| ROUGE-L candidate (mean over tasks) | {_f(c.candidate_rougeL)} |",
        f"| ROUGE-L baseline (mean over tasks) | {_f(c.baseline_rougeL)} |",
        f"| mean delta [{level} paired bootstrap] | {_signed(c.mean_delta)} "
        f"[{_signed(c.ci_low)}, {_signed(c.ci_high)}] |",
        "",
    ]
    if c.setting_differences:
        lines.append("Settings differ between the two evaluations (candidate vs baseline):")
        differences = c.setting_differences.items()
        lines += [f"- `{key}`: {pair[0]!r} vs {pair[1]!r}" for key, pair in differences]
        lines.append("")
    if c.categories:
        lines += ["| category | candidate | baseline | delta |", "|---|---:|---:|---:|"]
        lines += [
            f"| {name} | {_f(d.candidate)} | {_f(d.baseline)} | {_signed(d.delta)} |"
            for name, d in sorted(c.categories.items())
        ]
        lines.append("")
    lines += ["| task | candidate | baseline | delta | |", "|---|---:|---:|---:|---|"]
    lines += [
        f"| {row.task} | {_f(row.candidate)} | {_f(row.baseline)} | {_signed(row.delta)} "
        f"| {row.outcome} |"
        for row in c.per_task
    ]
    lines += [
        "",
        f"ROUGE-L: rouge_score rougeL F, Porter stemmer, max over references, 0–100; interval "
        f"from {c.bootstrap_samples} task resamples (seed {c.seed}).",
    ]
    return "\n".join(lines) + "\n"


def plot_deltas(comparison: Comparison, path: str | Path) -> None:
    """Horizontal bars of per-task delta, best at the top, coloured by outcome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison.per_task
    height = max(2.5, 0.22 * len(rows) + 1.2)
    figure, axes = plt.subplots(figsize=(9, height))
    positions = range(len(rows))
    axes.barh(
        list(positions),
        [row.delta for row in rows],
        color=[_COLOURS[row.outcome] for row in rows],
    )
    axes.set_yticks(list(positions), [_short(row.task) for row in rows], fontsize=7)
    axes.invert_yaxis()
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel("ROUGE-L delta (candidate − baseline)")
    axes.set_title(
        f"{comparison.improved}/{comparison.tasks} tasks improved "
        f"({comparison.pct_improved:.1f}%), mean delta {_signed(comparison.mean_delta)} "
        f"[{_signed(comparison.ci_low)}, {_signed(comparison.ci_high)}]",
        fontsize=9,
    )
    figure.tight_layout()
    with storage.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
