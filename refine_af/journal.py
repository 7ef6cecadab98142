"""Resumable stages: an append-only journal of finished work in the output folder.

A stage appends every unit of work it finishes (stage 1 a round, stage 3 a block) to
``journal.jsonl``, fsynced, so a killed run loses at most the unit in progress and the next
run replays the journal and continues. The first line records the settings that shape the
output (the resume key); a resume with other settings would mix two runs' output silently,
so it is refused naming the keys that differ, unless forced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refine_af import records
from refine_af.errors import InputError

JOURNAL = "journal.jsonl"


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resume keys."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def check_resume(
    journal: Path,
    events: list[dict[str, Any]],
    key: dict[str, Any],
    *,
    force_resume: bool,
    may_change: str,
) -> list[str]:
    """The settings a resume would change; refused (InputError) unless ``force_resume``.

    ``may_change`` names the settings left out of ``key``, for the message.
    """
    differing = differences(events[0].get("resume_key"), key)
    if differing and not force_resume:
        raise InputError(
            f"{journal}: this output folder holds a run with different settings: "
            f"{', '.join(differing)}; use a new --out folder, the earlier settings, or "
            f"--force-resume to mix them (only {may_change} may change)"
        )
    return differing


def check(out_dir: Path, key: dict[str, Any], *, force_resume: bool, may_change: str) -> None:
    """Refuse, before anything loads, a resume of ``out_dir`` with other settings."""
    journal = out_dir / JOURNAL
    if journal.is_file() and (events := records.read_journal(journal)):
        check_resume(journal, events, key, force_resume=force_resume, may_change=may_change)


def open_journal(
    out_dir: Path,
    key: dict[str, Any],
    config_hash: str,
    *,
    force_resume: bool,
    may_change: str,
) -> tuple[Path, list[dict[str, Any]]]:
    """The journal of ``out_dir`` and its events, starting one if there is none.

    A resume records itself (config hash, the keys it was forced past), so the summary can
    name every configuration the output came from.
    """
    journal = out_dir / JOURNAL
    events = records.read_journal(journal)
    if not events:
        start = {"event": "start", "resume_key": key, "config_hash": config_hash}
        records.append_jsonl(journal, [start])
        return journal, [start]
    differing = check_resume(journal, events, key, force_resume=force_resume, may_change=may_change)
    resume = {"event": "resume", "config_hash": config_hash, "forced": differing}
    records.append_jsonl(journal, [resume])
    return journal, [*events, resume]
