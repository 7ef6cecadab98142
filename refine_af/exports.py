"""Exports of stage 3's examples: a Hugging Face dataset folder and Alpaca-style JSON.

The JSONL records are the pipeline's own contract; these two formats are for everyone
else: ``datasets.load_dataset(folder)`` reads the parquet folder (its README.md is the
dataset card of ``refine_af.cards``), and most instruction-tuning scripts read Alpaca's
``[{instruction, input, output}]``.

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

from refine_af import storage
from refine_af.cards import dataset_card  # noqa: F401  stages/instances.py calls it here
from refine_af.records import ExampleRecord

DATA_DIR = "data"


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
