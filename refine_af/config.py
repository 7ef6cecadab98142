"""Typed run configuration: one pydantic tree, YAML presets, ``--set a.b=c`` overrides.

Configuration is data: a run is fully described by a preset plus overrides, unknown keys
are rejected (a typo must not silently fall back to a default), and the validated tree has
a stable hash that tags every artifact the run produces.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from refine_af.errors import InputError

PRESETS_DIR = resources.files("refine_af").joinpath("presets")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(Section):
    """Which model writes instructions and instances, and how it is placed."""

    base: str = Field(
        "smollm2-135m-instruct",
        description="builtin alias, local directory, hub id or s3://bucket/prefix",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class GenerationSettings(Section):
    """Sampling defaults shared by every stage that generates text."""

    backend: Literal["transformers"] = "transformers"
    batch_size: int = Field(16, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.5, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int = 42


class InstructionsSettings(Section):
    """Stage 1, Self-Instruct bootstrapping (defaults follow Self-Instruct)."""

    seed_tasks: str | None = Field(None, description="seed task JSONL; None = the bundled 175")
    num_instructions: int = Field(100, ge=1, description="machine instructions to reach")
    prompt_instructions: int = Field(8, ge=2, description="in-context instructions per prompt")
    prompt_machine_instructions: int = Field(2, ge=0, description="of those, machine-written")
    prompts_per_round: int = Field(8, ge=1, description="prompts generated together")
    max_new_tokens: int = Field(256, ge=8)
    stop: list[str] = ["\n\n", "\n16", "16.", "16 ."]
    min_words: int = Field(3, ge=0, description="drop candidates with this many words or fewer")
    max_words: int = Field(150, ge=1, description="drop candidates with more words")
    blocked_words: list[str] = [
        "image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
        "map", "maps", "draw", "plot", "go to",
    ]  # fmt: skip
    blocked_prefixes: list[str] = ["Write a program"]
    similarity_threshold: float = Field(0.7, ge=0.0, le=1.0, description="ROUGE-L F that rejects")
    most_similar: int = Field(10, ge=0, description="how many nearest pool items to record")
    record_avg_similarity: bool = Field(False, description="exact mean over the pool (all pairs)")
    detect_classification: bool = True
    classification_shots: int = Field(12, ge=2, description="few-shot examples, half of each kind")
    max_rounds: int = Field(1000, ge=1, description="give up after this many rounds")

    @model_validator(mode="after")
    def _machine_within_prompt(self) -> InstructionsSettings:
        if self.prompt_machine_instructions >= self.prompt_instructions:
            raise ValueError("prompt_machine_instructions must be smaller than prompt_instructions")
        if self.min_words >= self.max_words:
            raise ValueError("min_words must be smaller than max_words")
        return self


class RunConfig(Section):
    """The whole run: one section per concern, one per stage."""

    name: str = "refine-af"
    model: ModelSettings = ModelSettings()
    generation: GenerationSettings = GenerationSettings()
    stage1: InstructionsSettings = InstructionsSettings()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def config_hash(self) -> str:
        """Stable short hash of the validated values (key order and defaults normalised)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def preset_names() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml") for p in PRESETS_DIR.iterdir() if p.name.endswith(".yaml")
    )


def _read_yaml(source: str) -> tuple[dict[str, Any], str]:
    """Read a preset by name or a YAML file by path; returns (mapping, where it came from)."""
    path = Path(source)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise InputError(f"{source}: config file not found")
        text, origin = path.read_text(), str(path)
    elif source in preset_names():
        text = PRESETS_DIR.joinpath(f"{source}.yaml").read_text()
        origin = f"preset {source}"
    else:
        raise InputError(
            f"unknown preset or config file {source!r}; presets: {', '.join(preset_names())}"
        )
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{origin}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise InputError(f"{origin}: expected a mapping of sections at the top level")
    return data, origin


def parse_override(override: str) -> tuple[list[str], Any]:
    """``a.b=c`` → (["a", "b"], c) with c parsed as YAML, so numbers, bools and lists work."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise InputError(f"override {override!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise InputError(f"override {override!r}: value is not valid YAML: {err}") from err
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for override in overrides:
        path, value = parse_override(override)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InputError(f"override {override!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _validation_message(err: ValidationError, origin: str) -> str:
    lines = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown config key {where}")
        else:
            lines.append(f"{origin}: {where}: {problem['msg']}")
    return "\n".join(lines)


def load_config(source: str = "local-cpu", overrides: list[str] | None = None) -> RunConfig:
    """Validated config from a preset name or YAML path plus ``section.key=value`` overrides."""
    data, origin = _read_yaml(source)
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise InputError(_validation_message(err, origin)) from err
