"""What a stage's ``run`` returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StageResult:
    """The stage's output folder and its summary (also in ``summary.json`` there).

    A training stage's other processes return an empty summary: only the main process
    writes and reports.
    """

    out_dir: Path
    summary: dict[str, Any]
