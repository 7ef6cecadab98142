"""Stage 4: supervised fine-tuning of a LoRA adapter on stage 3's examples (trl SFTTrainer).

Each example becomes a prompt (the instruction, and its input when it has one) and a
completion (the output); the loss covers the completion only. The prompt is wrapped in the
model's chat template when it has one, or in Alpaca's template otherwise
(``refine_af.templates``); the template is recorded with the adapter and as a version tag,
and stage 5 asks its questions in it. Whole instructions are held out for the eval loss, so
no task is both learnt and measured. The adapter is logged with ``mlflow.transformers`` (the
adapter and a reference to its base model) and registered as a new version of
``stage6.model_name``, tagged with the config hash, the dataset's hash and the policy that
wrote the data.

Outputs (in ``out_dir``): ``adapter/`` (LoRA weights, tokenizer, README.md model card; its
config names the base by its reference, so ``models.load_causal_lm(out_dir / "adapter")``
loads base + adapter anywhere; ``refine_af_template.json`` names the prompt template),
``sft_config.yaml``, ``metrics.jsonl``, ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from refine_af import models, records, serving, storage, threads, tracking
from refine_af.config import RunConfig
from refine_af.errors import InputError
from refine_af.exports import CARD_TEMPLATE
from refine_af.records import ExampleRecord
from refine_af.stages.rlaf import (
    CHECKPOINTS_DIR,
    RUN_KEY,
    StepCallback,
    deepspeed_config,
    forwarding_callback,
    resumable_checkpoint,
)
from refine_af.templates import Template, record_template, resolve_template, to_row

ADAPTER_DIR = "adapter"
MODEL_ARTIFACT = "model"
TAG = "refine_af."
# what the logged model needs to load; pinned to the versions that trained it
RUNTIME_PACKAGES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors")

# ---------------------------------------------------------------- data


def load_examples(
    path: str | Path, limits: records.LengthLimits | None = None
) -> tuple[list[ExampleRecord], str]:
    """Stage 3's examples and the policy (rl | base) that wrote them, all of one kind."""
    examples = records.read_records(path, ExampleRecord, limits)
    if not examples:
        raise InputError(f"{path}: no examples to fine-tune on (an empty dataset)")
    kinds = sorted({e.policy for e in examples})
    if len(kinds) > 1:
        raise InputError(
            f"{path}: examples of both policies ({', '.join(kinds)}); fine-tune on one "
            "policy's data so the registered version says which it learnt from"
        )
    return examples, kinds[0]


def split_by_instruction(
    examples: Sequence[ExampleRecord], fraction: float, seed: int, origin: str
) -> tuple[list[ExampleRecord], list[ExampleRecord]]:
    """(train, eval): a seeded share of the instructions, with all their examples, held out."""
    if fraction == 0:
        return list(examples), []
    ids = sorted({e.instruction_id for e in examples})
    if len(ids) < 2:
        raise InputError(
            f"{origin}: examples of {len(ids)} instruction; holding out stage4.eval_fraction "
            "needs at least 2 (or set stage4.eval_fraction=0)"
        )
    count = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    held_out = set(random.Random(seed).sample(ids, count))
    train = [e for e in examples if e.instruction_id not in held_out]
    return train, [e for e in examples if e.instruction_id in held_out]


# ---------------------------------------------------------------- training


def build_trainer(
    config: RunConfig,
    train: Sequence[dict[str, Any]],
    evaluation: Sequence[dict[str, Any]],
    checkpoints: Path,
    tokenizer,
    callbacks: Sequence[Any] = (),
):
    """trl's SFTTrainer for a LoRA on ``model.base``, loss on the completion only.

    Checkpoints go to ``checkpoints`` every ``stage4.save_steps`` steps, so a killed run
    continues from the last one (transformers' own save and resume).
    """
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    settings = config.stage4
    model = models.load_causal_lm(config.model.base, dtype=config.model.dtype, device="cpu")
    args = SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps or -1,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # below 1: a share of the training steps
        weight_decay=settings.weight_decay,
        per_device_train_batch_size=settings.per_device_batch_size,
        per_device_eval_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_length=settings.max_length,
        completion_only_loss=True,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=settings.bf16,
        activation_checkpointing=settings.gradient_checkpointing,
        deepspeed=deepspeed_config(settings.deepspeed, "stage4.deepspeed"),
        use_cpu=config.model.device == "cpu",
        eval_strategy="epoch" if evaluation else "no",
        logging_steps=settings.logging_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        report_to="none",
        disable_tqdm=True,
    )
    lora = settings.lora
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(list(train)),
        eval_dataset=Dataset.from_list(list(evaluation)) if evaluation else None,
        processing_class=tokenizer,
        peft_config=models.lora_config(lora),
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # progress and metrics go through our callback
    return trainer


# ---------------------------------------------------------------- outputs


def model_card(summary: dict[str, Any], config: RunConfig) -> str:
    """README.md of the adapter: what it was trained on, how, and how to load it.

    It names its inputs and itself by durable references (the dataset's digest, the config
    hash, the MLflow run and registered version), never by a path on the training machine.
    """
    from huggingface_hub import ModelCard, ModelCardData

    s, lora = config.stage4, config.stage4.lora
    base = models.public_reference(config.model.base)
    name, registered = summary.get("registered_model"), summary.get("registered_version")
    model_uri = f"models:/{name}/{registered}"
    registry = f"- registry: `{name}` version {registered} (`{model_uri}`)"
    ask = serving.request(serving.task_for(summary["template"]), "Give me three tips.")
    use_mlflow = [
        "```python",
        "import mlflow",
        f'model = mlflow.pyfunc.load_model("{model_uri}")',
        f"model.predict({ask!r})  # its request format: refine-af docs/serving.md",
    ]
    if not registered:  # the card logged with the model is written before MLflow numbers it
        registry = f"- registry: a version of `{name}`" if name else "- registry: not registered"
        use_mlflow = []
    metadata = ModelCardData(
        base_model=base,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=["refine-af", "lora", "sft", "trl", f"policy-{summary['policy']}"],
    )
    lines = [
        f"# REFINE-AF instruction-tuned LoRA adapter ({summary['policy']} policy data)",
        "",
        f"A LoRA adapter for `{base}`, fine-tuned with trl's SFTTrainer on "
        f"{summary['train_examples']} examples that the {summary['policy']} policy wrote in "
        "stage 3 of REFINE-AF (Roy et al., 2025); the loss covers the output only.",
        "",
        "## Data",
        "",
        f"- examples: sha256 `{summary['dataset_sha256']}`",
        f"- train: {summary['train_examples']} examples; held out: "
        f"{summary['eval_examples']} examples of {summary['eval_instructions']} instructions",
        f"- prompt template: {summary['template']}",
        "",
        "## Training",
        "",
        f"- LoRA r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, "
        f"modules={lora.target_modules}",
        f"- learning rate {s.learning_rate} ({s.lr_scheduler}, warmup {s.warmup_ratio}), "
        f"batch {s.per_device_batch_size} × {s.gradient_accumulation_steps} accumulation per "
        f"device, max length {s.max_length}, bf16 {s.bf16}",
        f"- steps: {summary['steps']} ({summary['epochs']} epochs)",
        f"- train loss: {summary['train_loss']}",
        f"- eval loss: {summary['eval_loss_before']} before → {summary['eval_loss']} after",
        "",
        "## Provenance",
        "",
        f"- config hash: `{summary['config_hash']}`",
        f"- MLflow run: `{summary['run_id']}`",
        registry,
        "",
        "## Use",
        "",
        *([*use_mlflow, "```", ""] if use_mlflow else []),
        "This folder with refine-af: `models.load_causal_lm('adapter')` (base + adapter).",
        "",
    ]
    card = ModelCard.from_template(metadata, template_str=CARD_TEMPLATE, body="\n".join(lines))
    return str(card)


def _save_adapter(trainer, staging: Path, base_reference: str) -> None:
    """Adapter + tokenizer in ``staging``, its config naming the base by its reference."""
    if trainer.accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every process: DeepSpeed gathers weights for it
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return
    trainer.processing_class.save_pretrained(str(staging))
    (staging / "training_args.bin").unlink(missing_ok=True)
    adapter_config = staging / models.ADAPTER_CONFIG
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = base_reference  # not this machine's cache path
    adapter_config.write_text(json.dumps(settings, indent=2) + "\n")


def _publish(staging: Path, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _pip_requirements() -> list[str]:
    pins = []
    for package in RUNTIME_PACKAGES:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


IDENTITY_TAGS = (f"{TAG}config_hash", f"{TAG}dataset_sha256")


def registered_version(client, name: str, tags: dict[str, str]) -> str | None:
    """The version of ``name`` already registered from this config and dataset, if any:
    re-running a finished stage must not add a duplicate version."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for version in versions:
        if all(version.tags.get(key) == tags[key] for key in IDENTITY_TAGS):
            return str(version.version)
    return None


def register(
    config: RunConfig,
    trainer,
    card: str,
    tags: dict[str, str],
    workspace: Path,
    template: Template,
) -> str:
    """Log the adapter with ``mlflow.transformers`` and register it; returns the version.

    A local base (the bundled model, an s3 mirror) is referenced by its path, a hub base by
    its repository and revision: either way only the adapter is stored. It is logged to be
    asked in ``template``, the format it was trained on (``serving.flavor_arguments``).
    """
    import mlflow
    from huggingface_hub import ModelCard

    name = config.stage6.model_name
    client = tracking.connect(workspace)
    if (existing := registered_version(client, name, tags)) is not None:
        return existing
    base_location = models.resolve(config.model.base)
    info = mlflow.transformers.log_model(
        transformers_model={
            "model": trainer.accelerator.unwrap_model(trainer.model),
            "tokenizer": trainer.processing_class,
        },
        name=MODEL_ARTIFACT,
        registered_model_name=name,
        base_model_path=base_location if Path(base_location).is_dir() else None,
        model_card=ModelCard(card),
        pip_requirements=_pip_requirements(),
        **serving.flavor_arguments(
            template,
            config.stage5.max_new_tokens,
            config.generation.temperature,
            config.generation.top_p,
        ),
    )
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return version


# ---------------------------------------------------------------- running the stage


@dataclass(frozen=True)
class SftResult:
    out_dir: Path
    summary: dict[str, Any]


@dataclass(frozen=True)
class Prepared:
    """Validated inputs: checked before any model loads or any output is written."""

    train: list[ExampleRecord]
    evaluation: list[ExampleRecord]
    policy: str
    dataset_sha256: str


def prepare(config: RunConfig, examples_path: str | Path) -> Prepared:
    examples, kind = load_examples(examples_path, config.limits.by_field())
    settings = config.stage4
    train, evaluation = split_by_instruction(
        examples, settings.eval_fraction, settings.seed, str(examples_path)
    )
    deepspeed_config(settings.deepspeed, "stage4.deepspeed")
    digest = hashlib.sha256(storage.read_bytes(str(examples_path))).hexdigest()
    return Prepared(train, evaluation, kind, digest)


def final_eval_loss(trainer) -> float:
    """The eval loss after training; the trainer's own end-of-epoch eval when it is the last."""
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if evaluations and evaluations[-1]["step"] == trainer.state.global_step:
        return evaluations[-1]["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 6)


def run(
    config: RunConfig,
    examples_path: str | Path,
    out_dir: Path,
    *,
    workspace: Path,
    parent_run_id: str | None = None,
    on_step: StepCallback | None = None,
) -> SftResult:
    """Fine-tune, save the adapter with its card, log and register it.

    Bad input (a missing or malformed examples file, an empty dataset, mixed policies, too
    few instructions to hold out, a missing DeepSpeed) raises InputError before any model
    loads and before anything is written.
    """
    threads.use_share_of_cores()
    from accelerate import PartialState

    main = PartialState().is_main_process
    settings = config.stage4
    data = prepare(config, examples_path)
    tokenizer = models.load_tokenizer(config.model.base)
    template = resolve_template(settings.template, tokenizer)
    started = time.monotonic()
    tags = {
        f"{TAG}config_hash": config.config_hash(),
        f"{TAG}dataset_sha256": data.dataset_sha256,
        f"{TAG}policy": data.policy,
        f"{TAG}base_model": config.model.base,
        f"{TAG}template": template,
    }
    tracked = (
        tracking.stage_run(
            "sft",
            workspace,
            config.to_dict(),
            parent_run_id=parent_run_id,
            tags=tags,
            out_dir=out_dir,
        )
        if main
        else nullcontext()
    )
    checkpoints = out_dir / CHECKPOINTS_DIR
    key = {
        "model": config.model.model_dump(mode="json"),
        "stage4": settings.model_dump(
            mode="json", exclude={"max_steps", "register_model", "logging_steps"}
        ),
        "dataset_sha256": data.dataset_sha256,
    }
    checkpoint = resumable_checkpoint(out_dir, key, "stage4.max_steps")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        storage.write_text(out_dir / RUN_KEY, json.dumps(key, indent=2) + "\n")
    with tracked as stage_run:
        trainer = build_trainer(
            config,
            [to_row(e, template) for e in data.train],
            [to_row(e, template) for e in data.evaluation],
            checkpoints,
            tokenizer,
            [forwarding_callback(stage_run, on_step)],
        )
        before = trainer.evaluate()["eval_loss"] if data.evaluation else None
        result = trainer.train(resume_from_checkpoint=checkpoint)
        after = final_eval_loss(trainer) if data.evaluation else None
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = out_dir / f".{ADAPTER_DIR}-staging"
        _save_adapter(trainer, staging, config.model.base)
        if not main:
            return SftResult(out_dir, {})
        summary: dict[str, Any] = {
            "stage": "sft",
            "config_hash": config.config_hash(),
            "policy": data.policy,
            "dataset_sha256": data.dataset_sha256,
            "template": template,
            "train_examples": len(data.train),
            "eval_examples": len(data.evaluation),
            "eval_instructions": len({e.instruction_id for e in data.evaluation}),
            "steps": trainer.state.global_step,
            "epochs": _round(trainer.state.epoch),
            "train_loss": _round(result.training_loss),
            "eval_loss_before": _round(before),
            "eval_loss": _round(after),
            "run_id": stage_run.run_id,
            "resumed_from_checkpoint": checkpoint,
            "registered_model": config.stage6.model_name if settings.register_model else None,
            "registered_version": None,
            "adapter": ADAPTER_DIR,
        }
        storage.write_text(staging / "README.md", model_card(summary, config))
        record_template(staging, template)
        _publish(staging, out_dir / ADAPTER_DIR)
        if settings.register_model:
            version_tags = {**tags, f"{TAG}sft_run_id": stage_run.run_id}
            if parent_run_id:
                version_tags[f"{TAG}parent_run_id"] = parent_run_id
            card = model_card(summary, config)
            summary["registered_version"] = register(
                config, trainer, card, version_tags, workspace, template
            )
            storage.write_text(out_dir / ADAPTER_DIR / "README.md", model_card(summary, config))
        summary["seconds"] = round(time.monotonic() - started, 1)
        history = [entry for entry in trainer.state.log_history if "step" in entry]
        storage.write_text(out_dir / "sft_config.yaml", config.to_yaml())
        records.write_jsonl(out_dir / "metrics.jsonl", history)
        storage.write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        stage_run.log_artifact(out_dir / "summary.json")
        stage_run.log_artifact(out_dir / ADAPTER_DIR / "README.md")
        shutil.rmtree(checkpoints, ignore_errors=True)  # the adapter is published
    return SftResult(out_dir, summary)
