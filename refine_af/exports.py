"""Exports of stage 3's examples: a Hugging Face dataset folder and Alpaca-style JSON.

The JSONL records are the pipeline's own contract; these two formats are for everyone
else: ``datasets.load_dataset(folder)`` reads the parquet folder (its README.md is the
dataset card, saying how the data was made and under which licence the seeds are), and
most instruction-tuning scripts read Alpaca's ``[{instruction, input, output}]``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from refine_af import storage
from refine_af.records import ExampleRecord

PARQUET_FILE = "data/train-00000-of-00001.parquet"
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


def write_parquet(path: Path, examples: Sequence[ExampleRecord], score_names: Sequence[str]):
    """The records as one parquet file; the schema is explicit, so an empty set has it too."""
    from datasets import Dataset

    features = _features(score_names)
    columns: dict[str, list[Any]] = {name: [] for name in features}
    for example in examples:
        row = example.model_dump(mode="json")
        row["scores"] = {name: row["scores"].get(name) for name in score_names}
        for name in features:
            columns[name].append(row[name])
    dataset = Dataset.from_dict(columns, features=features)
    with storage.atomic_path(path) as temporary:
        dataset.to_parquet(str(temporary))


def _size_category(count: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if count < limit:
            return label
    return "100K<n<1M"


def seed_provenance(seed_tasks: str | None) -> tuple[str, str]:
    """(licence id for the card's metadata, sentence on where the seeds come from)."""
    if seed_tasks is None:
        return SEED_LICENSE, f"{SEED_SOURCE}, licensed Apache-2.0."
    return "unknown", f"a custom seed file, {seed_tasks}; its licence is not known here."


def _table(title: str, counts: dict[str, int]) -> list[str]:
    if not counts:
        return []
    lines = [f"| {title} | count |", "|---|---:|"]
    lines += [f"| {reason} | {count} |" for reason, count in counts.items()]
    return [*lines, ""]


def dataset_card(summary: dict[str, Any], seed_tasks: str | None) -> str:
    """The dataset card: metadata for the Hub, then how the data was made and what was cut."""
    licence, seeds = seed_provenance(seed_tasks)
    metadata = {
        "license": licence,
        "language": ["en"],
        "task_categories": ["text-generation"],
        "size_categories": [_size_category(summary["kept"])],
        "tags": ["refine-af", "self-instruct", "synthetic", f"policy-{summary['policy']}"],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": PARQUET_FILE}],
            }
        ],
    }
    adapter = summary["adapter"] or "none (the base model wrote the instances: the baseline)"
    reward = ", ".join(f"{c['weight']} × {c['scorer']}" for c in summary["reward"]["components"])
    min_reward = summary["min_reward"]
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).rstrip(),
        "---",
        "",
        f"# REFINE-AF instruction-tuning data ({summary['policy']} policy)",
        "",
        f"{summary['kept']} (instruction, input, output) examples for "
        f"{summary['instructions_with_examples']} of {summary['instructions']} instructions, "
        "written by a small LLM from machine-generated instructions (Self-Instruct) and scored "
        "with automated feedback (REFINE-AF, Roy et al., 2025).",
        "",
        "## How it was made",
        "",
        f"- model: `{summary['model']}`",
        f"- LoRA adapter (stage 2 policy): `{adapter}`",
        f"- instructions: sha256 `{summary['instructions_sha256']}`",
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
        f"`{summary['model']}`; its licence terms apply to them as well.",
        "",
    ]
    return "\n".join(lines)
