"""The one way a command shows what it did: a two-column table of labelled values."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.table import Table


def value_text(value: Any) -> str:
    """None as "-", floats to four places, everything else as it prints."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def rows(summary: Mapping[str, Any], keys: Sequence[str | tuple[str, str]]) -> list[tuple]:
    """(label, value) for ``keys`` of a stage's summary; a key may be (key, label). A
    mapping (counts by reason) becomes one row per entry, labelled ``label: reason``."""
    shown = []
    for item in keys:
        key, label = item if isinstance(item, tuple) else (item, item.replace("_", " "))
        value = summary[key]
        if isinstance(value, Mapping):
            shown += [(f"{label}: {reason}", count) for reason, count in value.items()]
        else:
            shown.append((label, value))
    return shown


def table(title: str, labelled: Iterable[tuple[str, Any]]) -> Table:
    """The summary table: label on the left, value on the right."""
    result = Table(title=title)
    result.add_column("")
    result.add_column("value", justify="right")
    for label, value in labelled:
        result.add_row(label, value_text(value))
    return result
