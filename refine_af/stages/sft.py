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
from pathlib import Path
from typing import Any

from refine_af import cards, models, records, storage, threads, tracking, trainer_args, training
from refine_af.config import RunConfig
from refine_af.errors import InputError
from refine_af.records import ExampleRecord
from refine_af.registration import TAG, register
from refine_af.results import StageResult
from refine_af.templates import record_template, resolve_template, to_row
from refine_af.training import ADAPTER_DIR, CHECKPOINTS_DIR, StepCallback

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


def trainer_arguments(config: RunConfig, checkpoints: Path, has_eval: bool) -> dict[str, Any]:
    """The SFTConfig arguments refine-af sets (``trainer_args.MANAGED["stage4"]``);
    ``stage4.trainer_args`` adds the others."""
    settings = config.stage4
    return {
        "output_dir": str(checkpoints),
        "num_train_epochs": settings.num_train_epochs,
        "max_steps": settings.max_steps or -1,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": settings.lr_scheduler,
        "warmup_steps": settings.warmup_ratio,  # below 1: a share of the training steps
        "weight_decay": settings.weight_decay,
        "per_device_train_batch_size": settings.per_device_batch_size,
        "per_device_eval_batch_size": settings.per_device_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "max_length": settings.max_length,
        "completion_only_loss": True,
        "seed": settings.seed,
        "data_seed": settings.seed,
        "bf16": settings.bf16,
        "activation_checkpointing": settings.gradient_checkpointing,
        "deepspeed": training.deepspeed_config(settings.deepspeed, "stage4.deepspeed"),
        "use_cpu": config.model.device == "cpu",
        "eval_strategy": "epoch" if has_eval else "no",
        "logging_steps": settings.logging_steps,
        "save_strategy": "steps",
        "save_steps": settings.save_steps,
        "save_total_limit": settings.save_total_limit,
        "report_to": "none",
        "disable_tqdm": True,
    }


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
    from trl import SFTTrainer

    settings = config.stage4
    model = models.load_causal_lm(config.model.base, dtype=config.model.dtype, device="cpu")
    arguments = trainer_arguments(config, checkpoints, bool(evaluation))
    args = trainer_args.build("sft", arguments, settings.trainer_args, "stage4")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(list(train)),
        eval_dataset=Dataset.from_list(list(evaluation)) if evaluation else None,
        processing_class=tokenizer,
        peft_config=models.lora_config(settings.lora),
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # progress and metrics go through our callback
    return trainer


# ---------------------------------------------------------------- running the stage


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
    training.deepspeed_config(settings.deepspeed, "stage4.deepspeed")
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
) -> StageResult:
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
    checkpoint = training.resumable_checkpoint(out_dir, key, "stage4.max_steps")
    earlier = training.seconds_before(checkpoint)  # spent by the invocations before this one
    if main:
        training.write_run_key(out_dir, key)
    with tracked as stage_run:
        trainer = build_trainer(
            config,
            [to_row(e, template) for e in data.train],
            [to_row(e, template) for e in data.evaluation],
            checkpoints,
            tokenizer,
            [
                training.forwarding_callback(stage_run, on_step),
                training.seconds_callback(earlier),
            ],
        )
        before = trainer.evaluate()["eval_loss"] if data.evaluation else None
        result = training.train(trainer, checkpoint)
        after = final_eval_loss(trainer) if data.evaluation else None
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = training.staging_dir(out_dir)
        if not training.save_adapter(trainer, staging, config.model.base):
            return StageResult(out_dir, {})
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
        storage.write_text(staging / "README.md", cards.model_card(summary, config))
        record_template(staging, template)
        training.publish(staging, out_dir / ADAPTER_DIR)
        if settings.register_model:
            version_tags = {**tags, f"{TAG}sft_run_id": stage_run.run_id}
            if parent_run_id:
                version_tags[f"{TAG}parent_run_id"] = parent_run_id
            card = cards.model_card(summary, config)
            summary["registered_version"] = register(
                config, trainer, card, version_tags, workspace, template
            )
            storage.write_text(
                out_dir / ADAPTER_DIR / "README.md", cards.model_card(summary, config)
            )
        summary["seconds"] = round(earlier + time.monotonic() - started, 1)
        history = training.log_history(trainer)
        storage.write_text(out_dir / "sft_config.yaml", config.to_yaml())
        records.write_jsonl(out_dir / "metrics.jsonl", history)
        storage.write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        stage_run.log_artifact(out_dir / "summary.json")
        stage_run.log_artifact(out_dir / ADAPTER_DIR / "README.md")
        shutil.rmtree(checkpoints, ignore_errors=True)  # the adapter is published
    return StageResult(out_dir, summary)
