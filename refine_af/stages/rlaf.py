"""Stage 2: reinforcement learning from automated feedback (REFINE-AF's RLAF).

The policy is the base model with a LoRA adapter; it writes instances for a stage-1
instruction from the instance-generation prompt in stage 3's format (``stage3.format``:
several per completion as Self-Instruct, or one), and the composite automated reward scores
what it wrote (a completion earns the mean reward of its instances). trl trains it: GRPO by
default, RLOO on request, both with the KL penalty to the frozen base (the adapter switched
off), maximising E[r] − β·KL(π‖π_ref). The paper used PPO; trl ≥ 1.0 no longer ships
PPOTrainer, and GRPO/RLOO optimise the same KL-regularised objective without a value model.

Outputs (in ``out_dir``): ``adapter/`` (LoRA weights + tokenizer; its config names the
base by its reference, so ``models.load_causal_lm(out_dir / "adapter")`` loads base +
adapter anywhere), ``rlaf_config.yaml``, ``reward.json`` (the reward definition),
``metrics.jsonl`` (the per-step log), ``reward_curves.png``, ``samples.jsonl`` and
``summary.json``. Trainer checkpoints in ``checkpoints/`` let a killed run continue.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from refine_af import models, plots, records, storage, threads, tracking, trainer_args, training
from refine_af.config import RlafSettings, RunConfig
from refine_af.errors import InputError
from refine_af.feedback import FAILURES, CompositeReward, build_scorers
from refine_af.instances_format import build_prompt
from refine_af.records import InstructionRecord
from refine_af.results import StageResult
from refine_af.training import ADAPTER_DIR, CHECKPOINTS_DIR, StepCallback
from refine_af.trl_rewards import TrlRewards, totals_before, totals_callback

# ---------------------------------------------------------------- inputs


def load_instructions(
    path: str | Path, settings: RlafSettings, limits: records.LengthLimits | None = None
) -> list[InstructionRecord]:
    """Stage 1's instructions (all of them, or a seeded sample of ``max_instructions``)."""
    instructions = records.read_records(path, InstructionRecord, limits)
    if not instructions:
        raise InputError(f"{path}: no instructions in the file")
    if settings.max_instructions is not None and settings.max_instructions < len(instructions):
        instructions = random.Random(settings.seed).sample(instructions, settings.max_instructions)
    return instructions


# ---------------------------------------------------------------- training


def _trainer_class(settings: RlafSettings):
    if settings.trainer == "rloo":
        from trl import RLOOTrainer

        return RLOOTrainer
    from trl import GRPOTrainer

    return GRPOTrainer


def trainer_arguments(
    config: RunConfig, checkpoints: Path, reward_weights: list[float]
) -> dict[str, Any]:
    """The trl config arguments refine-af sets (``trainer_args.MANAGED["stage2"]``);
    ``stage2.trainer_args`` adds the others."""
    settings = config.stage2
    return {
        "output_dir": str(checkpoints),
        "max_steps": settings.max_steps,
        "learning_rate": settings.learning_rate,
        "per_device_train_batch_size": settings.per_device_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "num_generations": settings.num_generations,
        "max_completion_length": settings.max_completion_length,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "beta": settings.kl_coef,
        "reward_weights": reward_weights,
        "seed": settings.seed,
        "bf16": settings.bf16,
        "activation_checkpointing": settings.gradient_checkpointing,
        "deepspeed": training.deepspeed_config(settings.deepspeed, "stage2.deepspeed"),
        "use_cpu": config.model.device == "cpu",
        "save_strategy": "steps",
        "save_steps": settings.save_steps,
        "save_total_limit": settings.save_total_limit,
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
    }


def build_trainer(
    config: RunConfig,
    instructions: Sequence[InstructionRecord],
    composite: CompositeReward,
    checkpoints: Path,
    callbacks: Sequence[Any] = (),
):
    """The trl trainer (GRPO or RLOO) for the LoRA policy; returns (trainer, rewards)."""
    from datasets import Dataset
    from transformers import PrinterCallback

    settings = config.stage2
    tokenizer = models.load_tokenizer(config.model.base)
    policy = models.load_causal_lm(config.model.base, dtype=config.model.dtype, device="cpu")
    eos = policy.generation_config.eos_token_id
    eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    fmt = config.stage3.format  # the policy learns to write what stage 3 will ask for
    rewards = TrlRewards(
        composite,
        max_completion_length=settings.max_completion_length,
        eos_token_ids=eos_ids,
        format=fmt,
        max_instances=config.stage3.max_per_instruction,
    )
    dataset = Dataset.from_dict(
        {
            "prompt": [build_prompt(r.instruction, r.is_classification, fmt) for r in instructions],
            "instruction": [r.instruction for r in instructions],
            "is_classification": [r.is_classification for r in instructions],
        }
    )
    arguments = trainer_arguments(config, checkpoints, rewards.weights())
    args = trainer_args.build(settings.trainer, arguments, settings.trainer_args, "stage2")
    trainer_class = _trainer_class(settings)
    trainer = trainer_class(
        model=policy,
        reward_funcs=rewards.functions(),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=models.lora_config(settings.lora),
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # progress and metrics go through our callback
    return trainer, rewards


# ---------------------------------------------------------------- outputs


def _run_key(config: RunConfig, instructions_path: str | Path) -> dict[str, Any]:
    """What must match to continue a run's checkpoints: all but the step count."""
    digest = hashlib.sha256(storage.read_bytes(str(instructions_path))).hexdigest()
    return {
        "model": config.model.model_dump(mode="json"),
        "stage2": config.stage2.model_dump(mode="json", exclude={"max_steps"}),
        "instructions_sha256": digest,
    }


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _write_outputs(
    out_dir: Path,
    config: RunConfig,
    rewards: TrlRewards,
    history: list[dict[str, Any]],
    summary: dict[str, Any],
) -> None:
    storage.write_text(out_dir / "rlaf_config.yaml", config.to_yaml())
    storage.write_text(
        out_dir / "reward.json", json.dumps(rewards.composite.definition(), indent=2) + "\n"
    )
    records.write_jsonl(out_dir / "metrics.jsonl", history)
    records.write_jsonl(out_dir / "samples.jsonl", list(rewards.samples))
    names = [scorer.name for scorer, _ in rewards.composite.components]
    plots.plot_reward_curves(history, names, out_dir / "reward_curves.png")
    storage.write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def run(
    config: RunConfig,
    instructions_path: str | Path,
    out_dir: Path,
    *,
    workspace: Path,
    parent_run_id: str | None = None,
    on_step: StepCallback | None = None,
) -> StageResult:
    """Train the instance-writing policy; continue from checkpoints already in ``out_dir``.

    Bad input (no instructions, an unknown or missing scorer model, a checkpoint folder of
    another run) raises InputError before any model trains. Logs params, per-step metrics
    (composite reward, each component's mean, KL, loss, floored shares) and the reward
    curves to MLflow from the main process.
    """
    threads.use_share_of_cores()
    from accelerate import PartialState

    main = PartialState().is_main_process
    settings = config.stage2
    instructions = load_instructions(instructions_path, settings, config.limits.by_field())
    training.deepspeed_config(settings.deepspeed, "stage2.deepspeed")
    key = _run_key(config, instructions_path)
    checkpoint = training.resumable_checkpoint(out_dir, key, "stage2.max_steps")
    names = [component.scorer for component in settings.reward.components]
    composite = CompositeReward.from_settings(
        settings.reward, build_scorers(settings.scorers, names)
    )
    counted, seconds_before = totals_before(checkpoint)
    composite.totals.update(counted)
    if main:
        training.write_run_key(out_dir, key)
    started = time.monotonic()
    tags = {"refine_af.config_hash": config.config_hash()}
    tracked = (
        tracking.stage_run(
            "rlaf",
            workspace,
            config.to_dict(),
            parent_run_id=parent_run_id,
            tags=tags,
            out_dir=out_dir,
        )
        if main
        else nullcontext()
    )
    with tracked as stage_run:
        trainer, rewards = build_trainer(
            config,
            instructions,
            composite,
            out_dir / CHECKPOINTS_DIR,
            [
                training.forwarding_callback(stage_run, on_step),
                totals_callback(composite, seconds_before),
            ],
        )
        training.train(trainer, checkpoint)
        staging = training.staging_dir(out_dir)
        if not training.save_adapter(trainer, staging, config.model.base):
            return StageResult(out_dir, {})
        training.publish(staging, out_dir / ADAPTER_DIR)
        history = training.log_history(trainer)
        per_step = [h["reward"] for h in history if h.get("reward") is not None]
        summary = {
            "stage": "rlaf",
            "config_hash": config.config_hash(),
            "run_id": stage_run.run_id,
            "trainer": settings.trainer,
            "instructions": len(instructions),
            "steps": trainer.state.global_step,
            "resumed_from_checkpoint": checkpoint,
            "seconds": round(seconds_before + time.monotonic() - started, 1),
            "reward_first5": _mean(per_step[:5]),
            "reward_last5": _mean(per_step[-5:]),
            "completions_scored": rewards.composite.totals["scored"],
            "floored": {f: rewards.composite.totals[f] for f in FAILURES},
            "adapter": ADAPTER_DIR,
        }
        _write_outputs(out_dir, config, rewards, history, summary)
        for name in ("summary.json", "reward.json", "reward_curves.png", "samples.jsonl"):
            stage_run.log_artifact(out_dir / name)
    return StageResult(out_dir, summary)
