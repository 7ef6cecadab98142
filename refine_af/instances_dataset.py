"""Stage 3's outputs: the records, their summary, and the dataset built from them.

Shared by the stage (one shard or the whole run) and ``merge`` (the shards joined), so a
merged dataset is written by the same code as an unsharded one, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refine_af import exports, records, storage, tracking
from refine_af.config import RunConfig
from refine_af.instance_writer import Part, policy

EXAMPLES, FILTERED, QUARANTINE = "examples.jsonl", "filtered.jsonl", "quarantine.jsonl"
SHARD_INFO, SUMMARY, ALPACA, DATASET_DIR = "shard.json", "summary.json", "alpaca.json", "dataset"
SAMPLES_LOGGED = 32
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class InstancesResult:
    out_dir: Path
    summary: dict[str, Any]


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(storage.read_bytes(str(path))).hexdigest()


def adapter_reference(adapter: str | None, uri: str | None = None) -> dict[str, Any] | None:
    """Durable names of stage 2's adapter for the dataset card: its weights' digest, the MLflow
    run that trained it (from stage 2's summary.json beside it) and its artifact URI (``uri``,
    e.g. the KFP artifact's ``s3://…``; ``adapter`` itself when that is an s3 URI)."""
    if adapter is None:
        return None
    folder = str(adapter).rstrip("/")
    weights = f"{folder}/{ADAPTER_WEIGHTS}"
    stage2_summary = f"{folder.rsplit('/', 1)[0]}/{SUMMARY}" if "/" in folder else SUMMARY
    run_id = None
    if storage.exists(stage2_summary):
        run_id = json.loads(storage.read_text(stage2_summary)).get("run_id")
    remote = uri if uri and "://" in uri else (folder if storage.is_s3(folder) else None)
    return {
        "sha256": file_sha256(weights) if storage.exists(weights) else None,
        "uri": remote,
        "mlflow_run_id": run_id,
    }


def write_records(out_dir: Path, part: Part) -> None:
    records.write_jsonl(out_dir / EXAMPLES, part.examples)
    records.write_jsonl(out_dir / FILTERED, part.filtered)
    records.write_jsonl(out_dir / QUARANTINE, part.quarantined)


def summary_of(
    config: RunConfig,
    part: Part,
    *,
    adapter: dict[str, Any] | None,
    instructions_sha256: str,
    shards: int,
    seconds: float,
) -> dict[str, Any]:
    settings = config.stage3
    return {
        "stage": "instances",
        "config_hash": config.config_hash(),
        "policy": policy(config),
        "model": config.model.base,
        "adapter": adapter,
        "instructions_sha256": instructions_sha256,
        "samples_per_instruction": settings.samples_per_instruction,
        "max_per_instruction": settings.max_per_instruction,
        "min_reward": settings.min_reward,
        "reward": {
            "components": [c.model_dump() for c in config.stage2.reward.components],
            "bias": config.stage2.reward.bias,
        },
        "shards": shards,
        **part.counts(),
        "seconds": round(seconds, 1),
    }


def finalize(out_dir: Path, config: RunConfig, part: Part, summary: dict[str, Any]) -> None:
    """The dataset: records, filtered and quarantined entries, exports, card, summary."""
    write_records(out_dir, part)
    summary["dataset_sha256"] = file_sha256(out_dir / EXAMPLES)
    score_names = [c.scorer for c in config.stage2.reward.components]
    parquet = exports.write_parquet(out_dir / DATASET_DIR, part.examples, score_names)
    card = exports.dataset_card(summary, config.stage1.seed_tasks, parquet)
    storage.write_text(out_dir / DATASET_DIR / "README.md", card)
    exports.write_alpaca(out_dir / ALPACA, part.examples)
    storage.write_text(out_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")


def log_summary(stage_run: tracking.StageRun, out_dir: Path, summary: dict[str, Any]) -> None:
    """The counts as metrics, the summary and the first examples as artifacts."""
    metrics = {k: float(summary[k]) for k in ("instructions", "generations", "kept")}
    for group in ("filtered", "quarantined"):
        metrics.update({f"{group}.{reason}": float(n) for reason, n in summary[group].items()})
    if summary["mean_reward"] is not None:
        metrics["mean_reward"] = summary["mean_reward"]
    stage_run.log_metrics(metrics)
    stage_run.log_dict(summary, SUMMARY)
    lines = records.jsonl_lines((out_dir / EXAMPLES).read_text(encoding="utf-8"))[:SAMPLES_LOGGED]
    stage_run.log_text("".join(line + "\n" for line in lines), "samples.jsonl")
