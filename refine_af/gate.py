"""The promotion gate: a challenger's comparison with an opponent, condition by condition,
and the version tags that record a promotion decision and why.
"""

from __future__ import annotations

from typing import Literal

from refine_af.comparison import Comparison
from refine_af.config import RegistrySettings

PROMOTION = "refine_af.promotion."
Decision = Literal["promoted", "forced", "rejected", "unchanged"]


def check_gate(c: Comparison, gate: RegistrySettings, opponent: str) -> list[tuple[bool, str]]:
    """The gate's conditions against ``opponent``: (met?, why) each.

    Ties (|delta| ≤ stage5.tie_tolerance) do not count as improved.
    """
    enough = c.pct_improved >= gate.min_pct_tasks_improved
    kept_mean = c.mean_delta >= -gate.max_mean_drop
    return [
        (
            enough,
            f"{c.pct_improved:.1f}% of tasks improved over the {opponent} ({c.improved} of "
            f"{c.tasks}, {c.ties} tied), gate needs ≥ {gate.min_pct_tasks_improved:g}%",
        ),
        (
            kept_mean,
            f"mean ROUGE-L {c.candidate_rougeL:.2f} vs {c.baseline_rougeL:.2f} for the "
            f"{opponent} (delta {c.mean_delta:+.2f}, 95% CI [{c.ci_low:+.2f}, "
            f"{c.ci_high:+.2f}]), gate allows a drop of at most {gate.max_mean_drop:g}",
        ),
    ]


def promotion_tags(
    decision: Decision,
    reasons: list[str],
    opponents: dict[str, str],
    comparisons: dict[str, Comparison],
    gate: RegistrySettings,
) -> dict[str, str]:
    tags = {
        f"{PROMOTION}decision": decision,
        f"{PROMOTION}reason": "; ".join(reasons),
        f"{PROMOTION}against": ", ".join(f"{k} v{v}" for k, v in opponents.items()) or "none",
        f"{PROMOTION}gate": (
            f"min_pct_tasks_improved={gate.min_pct_tasks_improved:g}, "
            f"max_mean_drop={gate.max_mean_drop:g}"
        ),
    }
    for opponent, compared in comparisons.items():
        prefix = f"{PROMOTION}{opponent}."
        tags.update(
            {
                f"{prefix}version": opponents[opponent],
                f"{prefix}pct_tasks_improved": f"{compared.pct_improved:.2f}",
                f"{prefix}tasks": f"{compared.improved} improved, {compared.ties} tied, "
                f"{compared.worse} worse of {compared.tasks}",
                f"{prefix}mean_delta": f"{compared.mean_delta:.4f}",
                f"{prefix}ci95": f"[{compared.ci_low:.4f}, {compared.ci_high:.4f}]",
            }
        )
    return tags
