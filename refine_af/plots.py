"""Charts of a training run: the RLAF reward curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refine_af import storage


def _curves(history: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, list]:
    """Per-step series of the composite reward and each component's mean."""
    keys = {"reward": "reward", **{name: f"rewards/{name}/mean" for name in names}}
    return {
        label: [(h["step"], h[key]) for h in history if h.get(key) is not None]
        for label, key in keys.items()
    }


def plot_reward_curves(history: Sequence[dict[str, Any]], names: Sequence[str], path: Path):
    """A PNG of the composite reward and its components per step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    curves = _curves(history, names)
    reward = curves.pop("reward")
    if reward:
        top.plot(*zip(*reward, strict=True), color="black")
    top.set_ylabel("composite reward")
    for name, points in curves.items():
        if points:  # a component has no mean on steps where every item got the floor
            bottom.plot(*zip(*points, strict=True), label=name)
    bottom.set_ylabel("component mean")
    bottom.set_xlabel("step")
    if bottom.lines:
        bottom.legend(fontsize="small")
    top.set_title("RLAF reward per step")
    figure.tight_layout()
    with storage.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
