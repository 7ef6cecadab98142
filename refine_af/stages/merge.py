"""Stage 3's merge: the shard folders of one run joined into the dataset, in shard order.

A shard's blocks do not depend on the shard that ran them (``refine_af.sharding``), so the
concatenation is, byte for byte, the dataset an unsharded run writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from refine_af import records, tracking
from refine_af.config import RunConfig
from refine_af.errors import InputError
from refine_af.instance_writer import Part, policy
from refine_af.instances_dataset import (
    EXAMPLES,
    FILTERED,
    QUARANTINE,
    SHARD_INFO,
    InstancesResult,
    finalize,
    log_summary,
    summary_of,
)
from refine_af.records import ExampleRecord, SetAsideEntry

SHARD_KEYS = frozenset(
    ("shard", "shards", "config", "config_hash", "instructions_sha256", "instructions",
     "generations")
)  # fmt: skip


def _entries(path: Path) -> list[dict[str, Any]]:
    return [entry.model_dump() for entry in records.read_records(path, SetAsideEntry)]


def read_shard(shard_dir: Path) -> tuple[dict[str, Any], Part]:
    """A shard folder's ``shard.json`` and records."""
    info_path = shard_dir / SHARD_INFO
    if not info_path.is_file():
        raise InputError(f"{shard_dir}: not a stage 3 shard folder (no {SHARD_INFO})")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{info_path}: not valid JSON ({err.msg})") from err
    missing = sorted(SHARD_KEYS - set(info))
    if missing:
        raise InputError(f"{info_path}: missing {', '.join(missing)}")
    part = Part(
        instructions=info["instructions"],
        generations=info["generations"],
        examples=records.read_records(shard_dir / EXAMPLES, ExampleRecord),
        filtered=_entries(shard_dir / FILTERED),
        quarantined=_entries(shard_dir / QUARANTINE),
    )
    return info, part


def check_shards(infos: Sequence[dict[str, Any]], shard_dirs: Sequence[Path]) -> None:
    """Every shard of one run, each exactly once."""
    first = infos[0]
    for info, where in zip(infos, shard_dirs, strict=True):
        for key in ("config_hash", "instructions_sha256", "shards"):
            if info[key] != first[key]:
                raise InputError(
                    f"{where}: {key} {info[key]!r} differs from {shard_dirs[0]}'s "
                    f"{first[key]!r}; merge shards of one run only"
                )
    found = sorted(info["shard"] for info in infos)
    if found != list(range(first["shards"])):
        raise InputError(f"merge needs shards 0..{first['shards'] - 1} once each; got {found}")


def merge(shard_dirs: Sequence[Path], out_dir: Path, *, workspace: Path) -> InstancesResult:
    """Join shard folders into the dataset, in shard order (the order of the instructions)."""
    if not shard_dirs:
        raise InputError("merge needs at least one shard folder")
    started = time.monotonic()
    read = [read_shard(Path(d)) for d in shard_dirs]
    infos = [info for info, _ in read]
    check_shards(infos, shard_dirs)
    try:
        config = RunConfig.model_validate(infos[0]["config"])
    except ValidationError as err:
        raise InputError(f"{shard_dirs[0]}/{SHARD_INFO}: its config is not valid: {err}") from err
    part = Part()
    for _, shard_part in sorted(read, key=lambda item: item[0]["shard"]):
        part.extend(shard_part)
    summary = summary_of(
        config,
        part,
        adapter=infos[0]["adapter"],
        instructions_sha256=infos[0]["instructions_sha256"],
        shards=infos[0]["shards"],
        seconds=time.monotonic() - started,
    )
    tags = {"refine_af.config_hash": config.config_hash(), "refine_af.policy": policy(config)}
    with tracking.stage_run(
        "instances-merge", workspace, config.to_dict(), tags=tags, out_dir=out_dir
    ) as run_:
        out_dir.mkdir(parents=True, exist_ok=True)
        finalize(out_dir, config, part, summary)
        log_summary(run_, out_dir, summary)
    return InstancesResult(out_dir, summary)
