"""Typed run configuration: one pydantic tree, YAML presets, ``--set a.b=c`` overrides.

Configuration is data: a run is fully described by a preset plus overrides, unknown keys
are rejected (a typo must not silently fall back to a default), and the validated tree has
a stable hash that tags every artifact the run produces.
"""

from __future__ import annotations

import hashlib
import json
import string
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from refine_af import trainer_args
from refine_af.errors import InputError

PRESETS_DIR = resources.files("refine_af").joinpath("presets")


def _numeric_only(annotation: Any) -> bool:
    """True when a field takes numbers but not booleans (``int``, ``float | None``…)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        return bool not in options and any(_numeric_only(option) for option in options)
    return annotation in (int, float)


class _TrainerArgs(BaseModel):
    """Leaves ``trainer_args`` out of the dump while it is empty, so configs that pass no
    trainer arguments keep the hash and run keys they had before the key existed."""

    @model_serializer(mode="wrap")
    def _without_empty_trainer_args(self, handler) -> dict[str, Any]:
        data = handler(self)
        if not data.get("trainer_args"):
            data.pop("trainer_args", None)
        return data


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on set.

    Infinity and NaN are no setting's meaningful value, and ``true`` is not the number 1
    (pydantic's lax mode would take both), so both are refused.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field and _numeric_only(field.annotation):
                    raise ValueError(f"{name}: expected a number, got {str(value).lower()}")
        return data


class ModelSettings(Section):
    """Which model writes instructions and instances, and how it is placed."""

    base: str = Field(
        "smollm2-135m-instruct",
        description="builtin alias, local directory, hub id or s3://bucket/prefix",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class EndpointSettings(Section):
    """An OpenAI-compatible generation server (vLLM's, or ``transformers serve``)."""

    base_url: str = Field("", description="e.g. http://vllm:8000/v1; required for backend openai")
    model: str = Field(
        "",
        description="served name of model.base; empty = model.base (a builtin alias: its folder)",
    )
    server: Literal["vllm", "transformers"] = Field(
        "vllm",
        description="what answers: vllm (logprobs, LoRA adapters loaded at run time) or "
        "transformers serve (no logprobs: the judge runs in-process)",
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable with the key")
    max_concurrency: int = Field(
        32,
        ge=1,
        description="requests in flight at once; a continuous-batching server batches them "
        "(a server without it answers one at a time: lower this or raise timeout)",
    )
    timeout: float = Field(300.0, gt=0.0, description="seconds per request")
    max_retries: int = Field(2, ge=0, description="the openai client's retries per request")


class GenerationSettings(Section):
    """Sampling defaults shared by every stage that generates text."""

    backend: Literal["transformers", "openai"] = Field(
        "transformers", description="transformers: in-process; openai: the endpoint below"
    )
    endpoint: EndpointSettings = EndpointSettings()
    batch_size: int = Field(16, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.5, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int = 42

    @model_validator(mode="after")
    def _endpoint_named(self) -> GenerationSettings:
        if self.backend == "openai" and not self.endpoint.base_url:
            raise ValueError("backend openai needs endpoint.base_url")
        return self


class InstructionsSettings(Section):
    """Stage 1, Self-Instruct bootstrapping (defaults follow Self-Instruct)."""

    seed_tasks: str | None = Field(None, description="seed task JSONL; None = the bundled 175")
    num_instructions: int = Field(100, ge=1, description="machine instructions to reach")
    prompt_instructions: int = Field(8, ge=2, description="in-context instructions per prompt")
    prompt_machine_instructions: int = Field(2, ge=0, description="of those, machine-written")
    prompts_per_round: int = Field(8, ge=1, description="prompts generated together")
    max_new_tokens: int = Field(256, ge=8)
    stop: list[str] = ["\n\n", "\n16", "16.", "16 ."]
    on_token_limit: Literal["drop_last", "drop_response"] = Field(
        "drop_last",
        description="a continuation cut by max_new_tokens: set aside its unfinished last "
        "item, or the whole continuation (Self-Instruct)",
    )
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


# Stage 2 scorer names: the reward model, UniEval's dialogue dimensions, and the same
# questions (plus helpfulness, standing in for the reward model) asked of an LLM judge.
UNIEVAL_DIMENSIONS = ("naturalness", "coherence", "understandability")
JUDGE_DIMENSIONS = ("helpfulness", *UNIEVAL_DIMENSIONS)
SCORER_NAMES = (
    "reward_model",
    *(f"unieval.{d}" for d in UNIEVAL_DIMENSIONS),
    *(f"llm_judge.{d}" for d in JUDGE_DIMENSIONS),
)
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]


class RewardModelSettings(Section):
    """A sequence-classification reward model (the paper's family: OpenAssistant's)."""

    model: str = "OpenAssistant/reward-model-deberta-v3-large-v2"
    prompt_format: Literal["auto", "pair", "oasst"] = Field(
        "auto",
        description="pair: a (question, answer) sentence pair (DeBERTa RMs); oasst: "
        "<|prompter|>q<|endoftext|><|assistant|>a<|endoftext|> (GPT-NeoX RMs); "
        "auto: oasst for GPT-NeoX, else pair",
    )
    max_length: int = Field(512, ge=16, description="tokens; longer inputs are truncated")
    batch_size: int = Field(8, ge=1)
    dtype: Dtype = "float32"
    device: Device = "auto"


class UniEvalSettings(Section):
    """UniEval's T5 boolean-QA evaluator for dialogue responses."""

    model: str = "MingZhong/unieval-dialog"
    max_length: int = Field(1024, ge=16)
    batch_size: int = Field(8, ge=1)
    dtype: Dtype = "float32"
    device: Device = "auto"


class JudgeSettings(Section):
    """A causal instruct model asked UniEval's questions, scored by P(Yes) / (P(Yes) + P(No))."""

    model: str = "smollm2-135m-instruct"
    chat: bool = Field(True, description="ask in the model's chat template, if it has one")
    batch_size: int = Field(8, ge=1)
    dtype: Dtype = "float32"
    device: Device = "auto"


class ScorerSettings(Section):
    """Where each scorer family's model comes from; only those the reward uses are loaded."""

    reward_model: RewardModelSettings = RewardModelSettings()
    unieval: UniEvalSettings = UniEvalSettings()
    llm_judge: JudgeSettings = JudgeSettings()


class RewardComponent(Section):
    scorer: str
    weight: float = Field(allow_inf_nan=False)


REWARD_FORMULAS: dict[str, dict[str, Any]] = {
    # REFINE-AF's reward: Instruction Mining's linear fit (Cao et al., 2023) of the
    # reward-model score and UniEval's understandability, naturalness and coherence
    "instruction-mining": {
        "components": [
            {"scorer": "reward_model", "weight": 0.0078},
            {"scorer": "unieval.understandability", "weight": -0.4421},
            {"scorer": "unieval.naturalness", "weight": 0.3212},
            {"scorer": "unieval.coherence", "weight": 0.1520},
        ],
        "bias": -0.0274,
    },
    # the same four scorers, 1.0 each (the reward model's logit dominates the sum)
    "equal-weight": {
        "components": [
            {"scorer": "reward_model", "weight": 1.0},
            *({"scorer": f"unieval.{d}", "weight": 1.0} for d in UNIEVAL_DIMENSIONS),
        ],
        "bias": 0.0,
    },
}


def _plain_components(value: Any) -> Any:
    """Components as plain (scorer, weight) pairs, to compare a YAML list with a formula."""
    if not isinstance(value, list):
        return value
    plain = []
    for item in value:
        item = item.model_dump() if isinstance(item, BaseModel) else item
        if not isinstance(item, dict):
            return value
        plain.append((item.get("scorer"), float(item.get("weight", "nan"))))
    return plain


class RewardSettings(Section):
    """The composite reward r = Σ wᵢ·sᵢ + bias; unparseable or non-finite items get ``floor``."""

    formula: Literal["instruction-mining", "equal-weight"] | None = Field(
        None,
        description="a named reward: sets components and bias (None: give them yourself)",
    )
    components: list[RewardComponent] = [
        RewardComponent(scorer="reward_model", weight=1.0),
        *(RewardComponent(scorer=f"unieval.{d}", weight=1.0) for d in UNIEVAL_DIMENSIONS),
    ]
    bias: float = Field(0.0, allow_inf_nan=False)
    floor: float = Field(-1.0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _expand_formula(cls, data: Any) -> Any:
        """A named formula fills components and bias; different ones beside it are an error."""
        if not isinstance(data, dict) or data.get("formula") not in REWARD_FORMULAS:
            return data
        formula = REWARD_FORMULAS[data["formula"]]
        given = {key: data[key] for key in formula if data.get(key) is not None}
        for key, value in given.items():
            if key == "components":
                same = _plain_components(value) == _plain_components(formula[key])
            else:
                same = isinstance(value, int | float) and float(value) == formula[key]
            if not same:
                raise ValueError(
                    f"formula {data['formula']!r} sets {key}; drop {key} or the formula "
                    "(formula: null to give components and bias yourself)"
                )
        return {**data, **formula}

    @model_validator(mode="after")
    def _known_distinct_components(self) -> RewardSettings:
        if not self.components:
            raise ValueError("components must name at least one scorer")
        names = [c.scorer for c in self.components]
        unknown = sorted(set(names) - set(SCORER_NAMES))
        if unknown:
            raise ValueError(
                f"unknown scorer {', '.join(map(repr, unknown))}; known: {', '.join(SCORER_NAMES)}"
            )
        if len(set(names)) != len(names):
            raise ValueError("each scorer may appear only once in components")
        if all(c.weight == 0 for c in self.components):
            raise ValueError("at least one component needs a non-zero weight")
        return self


class LoraSettings(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class RlafSettings(Section, _TrainerArgs):
    """Stage 2, RL from automated feedback: LoRA policy, KL to the frozen base, trl trainer."""

    trainer: Literal["grpo", "rloo"] = "grpo"
    kl_coef: float = Field(0.05, ge=0.0, description="β in E[r] − β·KL(π‖π_ref)")
    learning_rate: float = Field(1e-5, gt=0.0)
    max_steps: int = Field(200, ge=1)
    per_device_batch_size: int = Field(8, ge=1, description="completions per device per step")
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_generations: int = Field(4, ge=2, description="completions per prompt (the group)")
    max_completion_length: int = Field(256, ge=8)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_instructions: int | None = Field(None, ge=1, description="train on a seeded sample")
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: str | None = Field(None, description="DeepSpeed JSON: a path or a bundled name")
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    trainer_args: dict[str, Any] = Field(
        {}, description="more GRPOConfig/RLOOConfig arguments, e.g. {scale_rewards: batch}"
    )
    lora: LoraSettings = LoraSettings()
    scorers: ScorerSettings = ScorerSettings()
    reward: RewardSettings = RewardSettings()

    @field_validator("trainer_args")
    @classmethod
    def _known_trainer_args(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        trainer_args.check(value, "stage2", info.data.get("trainer", "grpo"))
        return value

    @model_validator(mode="after")
    def _whole_groups(self) -> RlafSettings:
        completions = self.per_device_batch_size * self.gradient_accumulation_steps
        if completions % self.num_generations:
            raise ValueError(
                "per_device_batch_size × gradient_accumulation_steps "
                f"({completions}) must be a multiple of num_generations ({self.num_generations})"
            )
        return self


class InstancesSettings(Section):
    """Stage 3, instance generation with the stage 2 policy (post-processing as Self-Instruct)."""

    adapter: str | None = Field(
        None, description="stage 2's LoRA adapter folder; None = the base model (the baseline)"
    )
    sources: list[Literal["seed", "machine"]] = Field(
        ["machine"], min_length=1, description="which stage 1 instructions get instances"
    )
    format: Literal["one_per_prompt", "self_instruct"] = Field(
        "one_per_prompt",
        description="self_instruct: up to max_per_instruction instances per completion "
        "(Self-Instruct); one_per_prompt: one per completion. Stage 2 trains the policy "
        "to write this format",
    )
    samples_per_instruction: int = Field(5, ge=1, description="completions sampled per instruction")
    max_per_instruction: int = Field(
        5, ge=1, description="cap on kept instances per task (and per self_instruct completion)"
    )
    max_new_tokens: int = Field(256, ge=8)
    min_reward: float | None = Field(
        None, allow_inf_nan=False, description="drop examples whose composite reward is lower"
    )


class SftSettings(Section, _TrainerArgs):
    """Stage 4, supervised fine-tuning of a LoRA adapter on stage 3's examples (trl SFT)."""

    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="auto: the model's chat template if it has one, else Alpaca's"
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of instructions held out for the eval loss"
    )
    num_train_epochs: float = Field(3.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    learning_rate: float = Field(2e-4, gt=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    per_device_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    max_length: int = Field(1024, ge=16, description="tokens of prompt + completion")
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: str | None = Field(None, description="DeepSpeed JSON: a path or a bundled name")
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps; a re-run resumes")
    save_total_limit: int = Field(2, ge=1)
    register_model: bool = Field(
        True, description="register the adapter as a new version of stage6.model_name"
    )
    trainer_args: dict[str, Any] = Field(
        {}, description="more SFTConfig arguments, e.g. {packing: true}"
    )
    lora: LoraSettings = LoraSettings()

    @field_validator("trainer_args")
    @classmethod
    def _known_trainer_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        trainer_args.check(value, "stage4", "sft")
        return value


class EvaluationSettings(Section):
    """Stage 5, zero-shot SuperNI evaluation (defaults: the official 119 tasks × 100)."""

    data: str | None = Field(
        None, description="SuperNI-format JSONL (.jsonl/.jsonl.gz); None = the bundled test set"
    )
    tasks: int | list[str] | None = Field(
        None, description="a count (seeded sample), task names, or None for all"
    )
    per_task: int | None = Field(100, ge=1, description="first N instances of each task")
    prompt_template: str = (
        "Definition: {definition}\n\nNow complete the following example -\nInput: {input}\nOutput:"
    )
    chat: bool = Field(True, description="wrap the prompt in the model's chat template, if any")
    max_new_tokens: int = Field(128, ge=1)
    stop: list[str] = Field([], description="cut outputs here (for base models that run on)")
    batch_size: int = Field(16, ge=1)
    tie_tolerance: float = Field(0.0, ge=0.0, description="|delta| ≤ this many points is a tie")
    bootstrap_samples: int = Field(10000, ge=100)
    seed: int = 42

    @model_validator(mode="after")
    def _template_and_tasks(self) -> EvaluationSettings:
        parsed = string.Formatter().parse(self.prompt_template)
        if {name for _, name, _, _ in parsed if name is not None} != {"definition", "input"}:
            raise ValueError(
                "prompt_template must use exactly the placeholders {definition} and {input}"
            )
        if isinstance(self.tasks, int) and self.tasks < 1:
            raise ValueError("tasks must be at least 1")
        if isinstance(self.tasks, list) and not self.tasks:
            raise ValueError("tasks must name at least one task")
        return self


class RegistrySettings(Section):
    """Stage 6, the MLflow model registry and the gate a challenger passes to become champion."""

    model_name: str = Field("refine-af-model", min_length=1)
    min_pct_tasks_improved: float = Field(
        50.0, ge=0.0, le=100.0, description="% of SuperNI tasks better than the champion's"
    )
    max_mean_drop: float = Field(
        0.0, ge=0.0, description="ROUGE-L points the mean may fall below the champion's"
    )


class InputLimits(Section):
    """Longest text accepted in input records, checked when a stage reads them.

    An instruction of 200k words would otherwise reach a prompt and allocate tens of GB
    before anything says it is wrong.
    """

    max_instruction_chars: int = Field(5000, ge=1)
    max_input_chars: int = Field(20000, ge=1)
    max_output_chars: int = Field(20000, ge=1)

    def by_field(self) -> dict[str, tuple[int, str]]:
        """Record field → (limit, setting), the form ``records.read_records`` takes."""
        return {
            field: (getattr(self, f"max_{field}_chars"), f"limits.max_{field}_chars")
            for field in ("instruction", "input", "output")
        }


class RunConfig(Section):
    """The whole run: one section per concern, one per stage."""

    name: str = "refine-af"
    limits: InputLimits = InputLimits()
    model: ModelSettings = ModelSettings()
    generation: GenerationSettings = GenerationSettings()
    stage1: InstructionsSettings = InstructionsSettings()
    stage2: RlafSettings = RlafSettings()
    stage3: InstancesSettings = InstancesSettings()
    stage4: SftSettings = SftSettings()
    stage5: EvaluationSettings = EvaluationSettings()
    stage6: RegistrySettings = RegistrySettings()

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error, not "last wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} repeats the key of line {seen[key]}",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(source: str) -> tuple[dict[str, Any], str]:
    """Read a preset by name, a YAML file by path, or YAML text (a pipeline parameter).

    Returns the mapping and where it came from, for error messages.
    """
    path = Path(source)
    if "\n" in source:
        text, origin = source, "inline config"
    elif path.suffix in {".yaml", ".yml"} or path.exists():
        if path.is_dir():
            raise InputError(f"{source}: is a folder; expected a YAML config file")
        if not path.is_file():
            raise InputError(f"{source}: config file not found")
        try:
            text, origin = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as err:
            raise InputError(f"{source}: not UTF-8 text ({err.reason}); save it as UTF-8") from err
    elif source in preset_names():
        text = PRESETS_DIR.joinpath(f"{source}.yaml").read_text()
        origin = f"preset {source}"
    else:
        raise InputError(
            f"unknown preset or config file {source!r}; presets: {', '.join(preset_names())}"
        )
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # a SafeLoader subclass
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


def _blame(location: tuple[Any, ...], overrides: list[str], origin: str) -> str:
    """The ``--set`` that set the value at ``location``, else the file it came from."""
    for override in reversed(overrides):  # the last override of a key wins
        path = tuple(parse_override(override)[0])
        shared = min(len(path), len(location))
        if tuple(str(part) for part in location[:shared]) == path[:shared]:
            return f"--set {override}"
    return origin


def _validation_message(err: ValidationError, origin: str, overrides: list[str]) -> str:
    lines = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        culprit = _blame(problem["loc"], overrides, origin)
        if problem["type"] == "extra_forbidden":
            lines.append(f"{culprit}: unknown config key {where}")
        else:
            lines.append(f"{culprit}: {where}: {problem['msg']}")
    return "\n".join(lines)


def load_config(
    source: str = "local-cpu",
    overrides: list[str] | None = None,
    *,
    base_model: str = "",
    generation_endpoint: str = "",
) -> RunConfig:
    """Validated config from a preset name or YAML path plus ``section.key=value`` overrides.

    ``base_model``, when given, replaces ``model.base``; ``generation_endpoint``, when given,
    sends generation to that OpenAI-compatible server (pipeline parameters of their own).
    """
    data, origin = _read_yaml(source)
    extra = [f"model.base={base_model}"] if base_model else []
    if generation_endpoint:
        extra += [
            "generation.backend=openai",
            f"generation.endpoint.base_url={generation_endpoint}",
        ]
    every_override = [*(overrides or []), *extra]
    data = apply_overrides(data, every_override)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise InputError(_validation_message(err, origin, every_override)) from err


def load_resolved(text: str, expected_hash: str) -> RunConfig:
    """The configuration a pipeline's first step resolved (``RunConfig.to_yaml``), checked
    against the hash that step recorded: every later step runs exactly that configuration,
    never a preset looked up again in its own image."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise InputError(f"resolved config: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise InputError("resolved config: expected a mapping of sections at the top level")
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as err:
        raise InputError(_validation_message(err, "resolved config", [])) from err
    if config.config_hash() != expected_hash:
        raise InputError(
            f"resolved config hashes to {config.config_hash()}, not {expected_hash!r} as "
            "recorded when it was resolved: pass the config and config_hash of the same plan"
        )
    return config
