"""SuperNI evaluation data, prompts and metric, as the official protocol defines them.

The metric is natural-instructions' ``eval/automatic/evaluation.py`` for the English
(default) track: rouge_score's ``rougeL`` F-measure with the Porter stemmer and the
library's default tokenizer, the maximum over an instance's references, on a 0–100 scale.
Scores are averaged per task (and per category when the data names one); the headline
figure is the mean over tasks, so every task weighs the same in a comparison. The official
script's overall figure, the mean over instances, is kept beside it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import zlib
from collections.abc import Iterable, Sequence
from statistics import fmean
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from rouge_score import rouge_scorer

from refine_af import records, storage
from refine_af.data import superni_test_path
from refine_af.errors import InputError
from refine_af.records import Record

RESULT_FORMAT = "refine-af/superni-evaluation/v1"
_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


class SuperNIInstance(Record):
    """One test instance: the task's definition, the input and every accepted output."""

    task: str = Field(min_length=1)
    id: str = Field(min_length=1)
    definition: str = Field(min_length=1)
    input: str
    references: list[str] = Field(min_length=1)
    category: str | None = Field(None, validation_alias=AliasChoices("category", "task_category"))


# ---------------------------------------------------------------- data


def read_instances(path: str | None = None) -> tuple[list[SuperNIInstance], str]:
    """Instances of a SuperNI-format JSONL (``.gz`` allowed, local or s3://) and its URI.

    ``None`` reads the bundled English test set. An empty file or a repeated id stops
    with the file named, as any malformed line does.
    """
    uri = path or str(superni_test_path())
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError as err:
        raise InputError(f"{uri}: file not found") from err
    if uri.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise InputError(f"{uri}: not a valid gzip file ({err})") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{uri}: not UTF-8 text ({err.reason})") from err
    instances = records.parse_jsonl(text, SuperNIInstance, uri)
    if not instances:
        raise InputError(f"{uri}: no evaluation instances in the file")
    seen: set[str] = set()
    for instance in instances:
        if instance.id in seen:
            raise InputError(f"{uri}: instance id {instance.id!r} appears more than once")
        seen.add(instance.id)
    return instances, uri


def by_task(instances: Iterable[SuperNIInstance]) -> dict[str, list[SuperNIInstance]]:
    """Instances grouped by task, tasks in the order they first appear (the official order)."""
    groups: dict[str, list[SuperNIInstance]] = {}
    for instance in instances:
        groups.setdefault(instance.task, []).append(instance)
    return groups


def select(
    instances: Sequence[SuperNIInstance],
    tasks: int | list[str] | None,
    per_task: int | None,
    seed: int,
    source: str,
) -> list[SuperNIInstance]:
    """The deterministic subset to evaluate: which tasks, and the first ``per_task`` of each.

    ``tasks`` is a count (a seeded sample of tasks, kept in file order), a list of task
    names, or None for all. The first instances are taken, as the official protocol takes
    the first 100 of every task.
    """
    groups = by_task(instances)
    names = list(groups)
    if isinstance(tasks, list):
        unknown = sorted(set(tasks) - set(groups))
        if unknown:
            raise InputError(f"{source}: no instances of task(s) {', '.join(unknown)}")
        wanted = set(tasks)
        names = [name for name in names if name in wanted]
    elif tasks is not None and tasks < len(names):
        wanted = set(random.Random(seed).sample(names, tasks))
        names = [name for name in names if name in wanted]
    return [instance for name in names for instance in groups[name][:per_task]]


# ---------------------------------------------------------------- prompt and metric


def encode_prompt(template: str, instance: SuperNIInstance) -> str:
    """Zero-shot prompt: the task definition and the instance input, nothing else."""
    return template.format(definition=instance.definition.strip(), input=instance.input.strip())


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Official SuperNI ROUGE-L (0–100) of one prediction: the best F over its references."""
    return 100.0 * max(
        _SCORER.score(target=reference, prediction=prediction)["rougeL"].fmeasure
        for reference in references
    )


# ---------------------------------------------------------------- aggregation


class TaskResult(BaseModel):
    """Mean ROUGE-L of one task, and a fingerprint of exactly which instances it covers."""

    model_config = ConfigDict(extra="forbid")

    rougeL: float
    instances: int
    ids_sha256: str
    category: str | None = None


class EvaluationResult(BaseModel):
    """Stage 5's ``evaluation.json``: what comparisons and the registry gate read."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["refine-af/superni-evaluation/v1"] = RESULT_FORMAT
    model: str
    data: str
    rougeL: float = Field(description="mean over tasks of the per-task mean")
    rougeL_instances: float = Field(description="mean over instances (the official overall)")
    tasks: dict[str, TaskResult]
    categories: dict[str, float] = {}
    settings: dict[str, Any] = {}
    truncated: int = 0
    mlflow_run_id: str | None = None
    mlflow_artifact: str | None = None

    @property
    def instances(self) -> int:
        return sum(task.instances for task in self.tasks.values())


def ids_fingerprint(ids: Iterable[str]) -> str:
    """Short hash of an ordered id list: two results compare only on the same instances."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def task_fingerprints(instances: Iterable[SuperNIInstance]) -> dict[str, str]:
    return {
        task: ids_fingerprint(i.id for i in group) for task, group in by_task(instances).items()
    }


def aggregate(
    instances: Sequence[SuperNIInstance], scores: Sequence[float], **fields: Any
) -> EvaluationResult:
    """Per-task and per-category means of instance scores (categories only when given)."""
    per_task: dict[str, list[float]] = {}
    per_category: dict[str, list[float]] = {}
    for instance, score in zip(instances, scores, strict=True):
        per_task.setdefault(instance.task, []).append(score)
        if instance.category:
            per_category.setdefault(instance.category, []).append(score)
    groups = by_task(instances)
    tasks = {
        task: TaskResult(
            rougeL=fmean(values),
            instances=len(values),
            ids_sha256=ids_fingerprint(i.id for i in groups[task]),
            category=groups[task][0].category,
        )
        for task, values in per_task.items()
    }
    return EvaluationResult(
        rougeL=fmean(t.rougeL for t in tasks.values()),
        rougeL_instances=fmean(scores),
        tasks=tasks,
        categories={name: fmean(values) for name, values in per_category.items()},
        **fields,
    )


def read_result(uri: str) -> EvaluationResult:
    """An ``evaluation.json`` written by stage 5 (local or s3://)."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError as err:
        raise InputError(f"{uri}: file not found") from err
    return parse_result(text, uri)


def parse_result(text: str, origin: str) -> EvaluationResult:
    try:
        return EvaluationResult.model_validate(json.loads(text))
    except json.JSONDecodeError as err:
        raise InputError(f"{origin}: not valid JSON ({err.msg})") from err
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise InputError(
            f"{origin}: not a stage 5 evaluation result: field '{where}': {first['msg']}"
        ) from err
