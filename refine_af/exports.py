"""Exports of stage 3's examples: a Hugging Face dataset folder and Alpaca-style JSON.

The JSONL records are the pipeline's own contract; these two formats are for everyone
else: ``datasets.load_dataset(folder)`` reads the parquet folder (its README.md is the
dataset card, saying how the data was made and under which licence the seeds are), and
most instruction-tuning scripts read Alpaca's ``[{instruction, input, output}]``.

The parquet file is named by its content's digest. ``datasets`` caches a local folder under
the folder's name and the card's ``configs:`` patterns, not its path or its files' contents:
two exports with one file name would share a cache entry, and loading the second would
return the first's rows. A digest in the name makes the cache key follow the rows.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refine_af import models, storage
from refine_af.records import ExampleRecord

DATA_DIR = "data"
# huggingface_hub renders a card from its metadata and this template (jinja2)
CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"
SEED_SOURCE = "Self-Instruct's 175 human-written seed tasks (yizhongw/self-instruct)"
SEED_LICENSE = "apache-2.0"


def write_alpaca(path: Path, examples: Sequence[ExampleRecord]) -> None:
    rows = [{"instruction": e.instruction, "input": e.input, "output": e.output} for e in examples]
    storage.write_text(path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")


def _features(score_names: Sequence[str]):
    from datasets import Features, Value

    return Features(
        {
            "id": Value("string"),
            "instruction_id": Value("string"),
            "instruction": Value("string"),
            "input": Value("string"),
            "output": Value("string"),
            "scores": {name: Value("float64") for name in score_names},
            "reward": Value("float64"),
            "policy": Value("string"),
        }
    )


def write_parquet(
    folder: Path, examples: Sequence[ExampleRecord], score_names: Sequence[str]
) -> str:
    """The records as ``data/train-<digest>.parquet`` in ``folder``; returns that relative path.

    The schema is explicit, so an empty set has it too. Parquet files of an earlier export
    to the same folder are removed: a ``data/*.parquet`` glob finds this export's rows only.
    """
    from datasets import Dataset

    features = _features(score_names)
    columns: dict[str, list[Any]] = {name: [] for name in features}
    for example in examples:
        row = example.model_dump(mode="json")
        row["scores"] = {name: row["scores"].get(name) for name in score_names}
        for name in features:
            columns[name].append(row[name])
    buffer = io.BytesIO()
    Dataset.from_dict(columns, features=features).to_parquet(buffer)
    data = buffer.getvalue()
    relative = f"{DATA_DIR}/train-{hashlib.sha256(data).hexdigest()[:16]}.parquet"
    storage.write_bytes(folder / relative, data)
    for stale in (folder / DATA_DIR).glob("*.parquet"):
        if stale.name != Path(relative).name:
            stale.unlink()
    return relative


def _size_category(count: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if count < limit:
            return label
    return "100K<n<1M"


def seed_provenance(seed_tasks: str | None) -> tuple[str, str]:
    """(licence id for the card's metadata, sentence on where the seeds come from)."""
    if seed_tasks is None:
        return SEED_LICENSE, f"{SEED_SOURCE}, licensed Apache-2.0."
    name = seed_tasks if "://" in seed_tasks else Path(seed_tasks).name
    return "unknown", f"a custom seed file, {name}; its licence is not known here."


def _table(title: str, counts: dict[str, int]) -> list[str]:
    if not counts:
        return []
    lines = [f"| {title} | count |", "|---|---:|"]
    lines += [f"| {reason} | {count} |" for reason, count in counts.items()]
    return [*lines, ""]


def _adapter_lines(adapter: dict[str, Any] | None) -> list[str]:
    if adapter is None:
        return ["- LoRA adapter (stage 2 policy): none (the base model wrote the instances: "
                "the baseline)"]  # fmt: skip
    lines = [f"- LoRA adapter (stage 2 policy): weights sha256 `{adapter['sha256']}`"]
    if adapter.get("uri"):
        lines.append(f"  - artifact: `{adapter['uri']}`")
    if adapter.get("mlflow_run_id"):
        lines.append(f"  - MLflow run of stage 2: `{adapter['mlflow_run_id']}`")
    return lines


def dataset_card(summary: dict[str, Any], seed_tasks: str | None, parquet_file: str) -> str:
    """The dataset card: metadata for the Hub, then how the data was made and what was cut.

    It names its inputs by durable references (digests, MLflow run ids, artifact URIs,
    the config hash), never by a path on the machine that wrote it.
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    licence, seeds = seed_provenance(seed_tasks)
    metadata = DatasetCardData(
        license=licence,
        language=["en"],
        task_categories=["text-generation"],
        size_categories=[_size_category(summary["kept"])],
        tags=["refine-af", "self-instruct", "synthetic", f"policy-{summary['policy']}"],
        configs=[
            {"config_name": "default", "data_files": [{"split": "train", "path": parquet_file}]}
        ],
    )
    model = models.public_reference(summary["model"])
    reward = ", ".join(f"{c['weight']} × {c['scorer']}" for c in summary["reward"]["components"])
    min_reward = summary["min_reward"]
    lines = [
        f"# REFINE-AF instruction-tuning data ({summary['policy']} policy)",
        "",
        f"{summary['kept']} (instruction, input, output) examples for "
        f"{summary['instructions_with_examples']} of {summary['instructions']} instructions, "
        "written by a small LLM from machine-generated instructions (Self-Instruct) and scored "
        "with automated feedback (REFINE-AF, Roy et al., 2025).",
        "",
        "## Load it",
        "",
        "```python",
        "from datasets import load_dataset",
        'dataset = load_dataset("path/to/this/folder", split="train")',
        "```",
        "",
        "## How it was made",
        "",
        f"- model: `{model}`",
        *_adapter_lines(summary["adapter"]),
        f"- instructions: sha256 `{summary['instructions_sha256']}`",
        f"- examples (examples.jsonl): sha256 `{summary['dataset_sha256']}`",
        f"- samples per instruction: {summary['samples_per_instruction']}, "
        f"at most {summary['max_per_instruction']} kept per instruction",
        f"- reward: {reward} + {summary['reward']['bias']}",
        f"- minimum reward: {'none' if min_reward is None else min_reward}",
        f"- config hash: `{summary['config_hash']}`",
        f"- seed tasks: {seeds}",
        "",
        "## Columns",
        "",
        "`id`, `instruction_id`, `instruction`, `input` (may be empty), `output`, `scores` "
        "(each automated scorer's score), `reward` (their weighted sum), `policy` (`rl`: the "
        "RL-trained policy wrote it; `base`: the base model did).",
        "",
        "## Counts",
        "",
        f"{summary['generations']} sampled completions: {summary['kept']} kept, "
        f"{sum(summary['filtered'].values())} filtered by Self-Instruct's rules, "
        f"{sum(summary['quarantined'].values())} quarantined (no instance in them).",
        "",
        *_table("filtered", summary["filtered"]),
        *_table("quarantined", summary["quarantined"]),
        "## Licence",
        "",
        f"The instructions descend from {seeds} The examples were written by "
        f"`{model}`; its licence terms apply to them as well.",
        "",
    ]
    card = DatasetCard.from_template(metadata, template_str=CARD_TEMPLATE, body="\n".join(lines))
    return str(card)
