"""Record types of the pipeline and their JSONL files: validated reads, atomic writes.

Every stage reads and writes these, so a malformed line is reported once, here, with the
file, line and field, and every file a stage finishes appears whole or not at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from refine_af import storage
from refine_af.errors import InputError


class Record(BaseModel):
    """Base of every record: extra fields are kept out, missing fields are errors."""

    model_config = ConfigDict(extra="ignore")
    # Records whose ``id`` names them across a file: a repeated id is an input error.
    unique_ids: ClassVar[bool] = False


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must contain text, not only whitespace")
    return text


class SeedInstance(Record):
    input: str
    output: str


class SeedTask(Record):
    """A human-written task in Self-Instruct's seed format."""

    unique_ids: ClassVar[bool] = True
    id: str
    name: str
    instruction: str = Field(min_length=1)
    instances: list[SeedInstance] = Field(min_length=1)
    is_classification: bool

    _instruction_not_blank = field_validator("instruction")(_not_blank)


class InstructionRecord(Record):
    """An instruction of the pool: a seed, or one the model wrote and the filters kept."""

    unique_ids: ClassVar[bool] = True
    id: str
    instruction: str = Field(min_length=1)
    is_classification: bool
    source: Literal["seed", "machine"]
    most_similar: dict[str, float] = {}
    avg_similarity_score: float | None = None

    _instruction_not_blank = field_validator("instruction")(_not_blank)


class ExampleRecord(Record):
    """An (instruction, input, output) triplet with its automated-feedback scores."""

    unique_ids: ClassVar[bool] = True
    id: str
    instruction_id: str
    instruction: str
    input: str
    output: str
    scores: dict[str, float] = {}
    reward: float | None = None
    policy: Literal["rl", "base"]


class SetAsideEntry(Record):
    """A filtered or quarantined item (``quarantine_entry``): why, with the context it had."""

    model_config = ConfigDict(extra="allow")
    reason: str


RecordT = TypeVar("RecordT", bound=Record)


def _field_error(path: str, lineno: int, err: ValidationError) -> InputError:
    problems = []
    for problem in err.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "(record)"
        problems.append(f"field '{field}': {problem['msg']}")
    return InputError(f"{path}:{lineno}: " + "; ".join(problems))


# Field name → (most characters, the config key that sets it), for ``parse_jsonl``.
LengthLimits = Mapping[str, tuple[int, str]]


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSONL text, split on ``\\n`` only.

    ``str.splitlines`` also splits on U+2028, U+2029, U+0085 and other characters that
    ``json.dumps(..., ensure_ascii=False)`` writes raw inside strings, so it would cut a
    valid record in two.
    """
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _oversized(value: Any, limits: LengthLimits, where: str = "") -> str | None:
    """The first field (dotted path) longer than its limit, with the limit, or None."""
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        path = f"{where}{key}"
        if isinstance(item, str) and key in limits and len(item) > limits[key][0]:
            limit, setting = limits[key]
            return f"field '{path}' has {len(item)} characters; the limit is {limit} ({setting})"
        if (problem := _oversized(item, limits, f"{path}.")) is not None:
            return problem
    return None


def parse_jsonl(
    text: str, model: type[RecordT], path: str, limits: LengthLimits | None = None
) -> list[RecordT]:
    """Validate every non-blank line; the first bad one stops with file:line and field.

    Bad means: not a JSON object, a missing or mistyped field, a field longer than its
    entry in ``limits``, or (for records with ``unique_ids``) an id already seen.
    """
    records = []
    first_line_of: dict[str, int] = {}
    for lineno, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if limits and (problem := _oversized(obj, limits)) is not None:
            raise InputError(f"{path}:{lineno}: {problem}")
        try:
            record = model.model_validate(obj)
        except ValidationError as err:
            raise _field_error(path, lineno, err) from err
        if model.unique_ids:
            record_id = record.id  # type: ignore[attr-defined]
            if record_id in first_line_of:
                raise InputError(
                    f"{path}:{lineno}: field 'id': {record_id!r} repeats the id of line "
                    f"{first_line_of[record_id]}; ids must be unique"
                )
            first_line_of[record_id] = lineno
        records.append(record)
    return records


def read_records(
    path: str | os.PathLike[str], model: type[RecordT], limits: LengthLimits | None = None
) -> list[RecordT]:
    """Read a JSONL file (local path or s3:// URI) of ``model`` records (see ``parse_jsonl``)."""
    uri = str(path)
    try:
        text = storage.read_text(uri)
    except FileNotFoundError as err:
        raise InputError(f"{uri}: file not found") from err
    except IsADirectoryError as err:
        raise InputError(f"{uri}: is a folder; expected a JSONL file") from err
    except NotADirectoryError as err:
        raise InputError(f"{uri}: a part of this path is a file, not a folder") from err
    except PermissionError as err:
        raise InputError(f"{uri}: permission denied") from err
    except UnicodeDecodeError as err:
        raise InputError(f"{uri}: not UTF-8 text ({err.reason})") from err
    return parse_jsonl(text, model, uri, limits)


def _as_json(row: BaseModel | Mapping[str, Any]) -> str:
    data = row.model_dump(mode="json") if isinstance(row, BaseModel) else dict(row)
    return json.dumps(data, ensure_ascii=False)


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[BaseModel | Mapping[str, Any]]) -> int:
    """Write rows atomically (temp file + rename, or one S3 put); returns the row count."""
    lines = [_as_json(row) for row in rows]
    storage.write_text(str(path), "".join(line + "\n" for line in lines))
    return len(lines)


def quarantine_entry(reason: str, **context: Any) -> dict[str, Any]:
    """A rejected or unparseable item, kept with why, so nothing is silently dropped."""
    return {"reason": reason, **context}


def append_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows to a local journal and fsync, so a killed run loses at most a torn line."""
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Read a journal written by ``append_jsonl``.

    A torn last line (no newline: the run was killed mid-write) is cut off the file, so the
    next append starts on a clean line; a bad complete line is corruption and stops the run.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    *complete, torn = data.split(b"\n")
    rows = []
    for lineno, line in enumerate(complete, start=1):
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{path}:{lineno}: corrupt journal line ({err})") from err
    if torn:
        with path.open("r+b") as handle:
            handle.truncate(len(data) - len(torn))
    return rows
