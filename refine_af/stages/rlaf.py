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
import importlib.util
import json
import math
import random
import shutil
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refine_af import launch, models, records, storage, threads, tracking
from refine_af.config import PRESETS_DIR, RlafSettings, RunConfig
from refine_af.errors import InputError
from refine_af.feedback import FAILURES, CompositeReward, RewardBatch, build_scorers
from refine_af.instances_format import Format, build_prompt, parse_instances
from refine_af.records import InstructionRecord

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
RUN_KEY = "run_key.json"
TOTALS_FILE = "refine_af_totals.json"  # in each checkpoint: what a resume cannot recompute
BIAS_OR_FLOOR = "bias_or_floor"
SAMPLES_KEPT = 32

StepCallback = Callable[[int, int, dict[str, float]], None]


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


def deepspeed_config(reference: str | None, setting: str = "stage2.deepspeed") -> str | None:
    """A DeepSpeed JSON file: a path, or the name of one bundled with the presets.

    Using DeepSpeed also gives a process without a launcher its world of one
    (``launch.single_process_rendezvous``), so one GPU needs no launcher.
    """
    if reference is None:
        return None
    if importlib.util.find_spec("deepspeed") is None:
        raise InputError(
            f"{setting}={reference!r} needs the deepspeed package (the runtime-gpu "
            f"image has it); install it or unset {setting}"
        )
    path = Path(reference)
    if not path.is_file():
        path = PRESETS_DIR.joinpath("deepspeed", f"{reference.removesuffix('.json')}.json")
    if not path.is_file():
        raise InputError(f"{setting}: {reference!r} is neither a file nor a bundled config")
    launch.single_process_rendezvous()
    return str(path)


# ---------------------------------------------------------------- rewards for trl


class _Component:
    """One scorer's score as a trl reward function (trl applies its weight and logs it)."""

    def __init__(self, rewards: TrlRewards, name: str) -> None:
        self.rewards, self.__name__ = rewards, name

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        return self.rewards.batch(prompts, completions, columns).scores[self.__name__]


class _BiasOrFloor:
    """The bias for scored items and the floor for the others (with weight 1).

    Components return None for floored items, which trl leaves out of its weighted sum, so
    trl's sum is exactly the composite reward: Σ wᵢ·sᵢ + bias, or the floor.
    """

    __name__ = BIAS_OR_FLOOR

    def __init__(self, rewards: TrlRewards) -> None:
        self.rewards = rewards

    def __call__(self, prompts, completions, **columns) -> list[float]:
        batch = self.rewards.batch(prompts, completions, columns)
        composite = self.rewards.composite
        return [composite.floor if f else composite.bias for f in batch.failures]


class TrlRewards:
    """The composite reward as trl reward functions, scored once per batch.

    trl calls every reward function with the same batch, one after the other; the first
    call parses and scores the batch and the others read the cached result.
    """

    def __init__(
        self,
        composite: CompositeReward,
        *,
        max_completion_length: int,
        eos_token_ids: set[int],
        format: Format = "one_per_prompt",
        max_instances: int = 5,
    ) -> None:
        self.composite = composite
        self.max_completion_length, self.eos_token_ids = max_completion_length, eos_token_ids
        self.format, self.max_instances = format, max_instances
        self.samples: deque[dict[str, Any]] = deque(maxlen=SAMPLES_KEPT)
        self._key: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._batch: RewardBatch | None = None

    def functions(self) -> list[Callable[..., list]]:
        components = [_Component(self, scorer.name) for scorer, _ in self.composite.components]
        return [*components, _BiasOrFloor(self)]

    def weights(self) -> list[float]:
        return [weight for _, weight in self.composite.components] + [1.0]

    def _finished(self, completion_ids: Sequence[int]) -> bool:
        return len(completion_ids) < self.max_completion_length or (
            bool(completion_ids) and completion_ids[-1] in self.eos_token_ids
        )

    def batch(self, prompts, completions, columns: dict[str, Any]) -> RewardBatch:
        key = (tuple(prompts), tuple(completions))
        if key == self._key and self._batch is not None:
            return self._batch
        groups = [
            parse_instances(
                instruction,
                is_classification,
                text,
                finished=self._finished(ids),
                format=self.format,
                max_instances=self.max_instances,
            )
            for instruction, is_classification, text, ids in zip(
                columns["instruction"],
                columns["is_classification"],
                completions,
                columns["completion_ids"],
                strict=True,
            )
        ]
        batch = self.composite.per_completion(groups)
        self._key, self._batch = key, batch
        counts = batch.failure_counts()
        if log_metric := columns.get("log_metric"):
            for failure in FAILURES:
                log_metric(f"floored/{failure}", counts[failure] / len(groups))
        for instruction, text, reward, failure in zip(
            columns["instruction"], completions, batch.rewards, batch.failures, strict=True
        ):
            self.samples.append(
                {
                    "instruction": instruction,
                    "completion": text,
                    "reward": reward,
                    "floored": failure,
                }
            )
        return batch


# ---------------------------------------------------------------- training


def _trainer_classes(settings: RlafSettings):
    if settings.trainer == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        return RLOOConfig, RLOOTrainer
    from trl import GRPOConfig, GRPOTrainer

    return GRPOConfig, GRPOTrainer


def forwarding_callback(stage_run: tracking.StageRun | None, on_step: StepCallback | None):
    """A trainer callback that sends each log line to MLflow and to the progress hook."""
    from transformers import TrainerCallback

    class Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if not state.is_world_process_zero or not logs:
                return
            metrics = {
                k: float(v)
                for k, v in logs.items()
                if isinstance(v, int | float) and math.isfinite(v)
            }
            if stage_run is not None:
                stage_run.log_metrics(metrics, step=state.global_step)
            if on_step is not None:
                on_step(state.global_step, state.max_steps, metrics)

    return Forward()


def totals_callback(composite: CompositeReward, seconds_before: float):
    """Save the reward totals and the seconds spent so far into every checkpoint, so the
    summary of a resumed run counts every invocation, not only the last."""
    from transformers import TrainerCallback

    started = time.monotonic()

    class SaveTotals(TrainerCallback):
        def on_save(self, args, state, control, **kwargs) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                seconds = seconds_before + time.monotonic() - started
                data = {"totals": dict(composite.totals), "seconds": seconds}
                storage.write_text(folder / TOTALS_FILE, json.dumps(data) + "\n")

    return SaveTotals()


def totals_before(checkpoint: str | None) -> tuple[dict[str, int], float]:
    """The totals and seconds saved with ``checkpoint`` (none without one)."""
    path = Path(checkpoint or "") / TOTALS_FILE
    if checkpoint is None or not path.is_file():
        return {}, 0.0
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved["totals"], float(saved["seconds"])


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
    config_class, trainer_class = _trainer_classes(settings)
    args = config_class(
        output_dir=str(checkpoints),
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        top_p=settings.top_p,
        beta=settings.kl_coef,
        reward_weights=rewards.weights(),
        seed=settings.seed,
        bf16=settings.bf16,
        activation_checkpointing=settings.gradient_checkpointing,
        deepspeed=deepspeed_config(settings.deepspeed),
        use_cpu=config.model.device == "cpu",
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
    )
    lora = settings.lora
    trainer = trainer_class(
        model=policy,
        reward_funcs=rewards.functions(),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=models.lora_config(lora),
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


def _last_checkpoint(checkpoints: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None


def resumable_checkpoint(out_dir: Path, key: dict[str, Any], may_change: str) -> str | None:
    """The last checkpoint in ``out_dir`` to continue from, refusing checkpoints of a run
    with another ``key`` (``may_change`` says which settings a resume may change)."""
    checkpoint = _last_checkpoint(out_dir / CHECKPOINTS_DIR)
    if checkpoint is None:
        return None
    key_file = out_dir / RUN_KEY
    if not key_file.is_file() or json.loads(key_file.read_text()) != key:
        raise InputError(
            f"{out_dir}: its checkpoints come from a run with different settings or "
            f"inputs; use a new --out folder (only {may_change} may change)"
        )
    return checkpoint


def _publish_adapter(trainer, out_dir: Path, base_reference: str) -> None:
    """Save adapter + tokenizer, record the base by its reference, swap the folder in."""
    staging = out_dir / f".{ADAPTER_DIR}-staging"
    if trainer.accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every process: DeepSpeed gathers weights for it
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return
    trainer.processing_class.save_pretrained(str(staging))
    adapter_config = staging / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = base_reference  # not this machine's cache path
    adapter_config.write_text(json.dumps(settings, indent=2) + "\n")
    target = out_dir / ADAPTER_DIR
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _curves(history: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, list]:
    """Per-step series of the composite reward and each component's mean."""
    keys = {"reward": "reward", **{name: f"rewards/{name}/mean" for name in names}}
    return {
        label: [(h["step"], h[key]) for h in history if h.get(key) is not None]
        for label, key in keys.items()
    }


def plot_reward_curves(history: Sequence[dict[str, Any]], names: Sequence[str], path: Path):
    """A PNG of the composite reward and its components per step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    curves = _curves(history, names)
    reward = curves.pop("reward")
    if reward:
        top.plot(*zip(*reward, strict=True), color="black")
    top.set_ylabel("composite reward")
    for name, points in curves.items():
        if points:  # a component has no mean on steps where every item got the floor
            bottom.plot(*zip(*points, strict=True), label=name)
    bottom.set_ylabel("component mean")
    bottom.set_xlabel("step")
    if bottom.lines:
        bottom.legend(fontsize="small")
    top.set_title("RLAF reward per step")
    figure.tight_layout()
    with storage.atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)


def _log_history(trainer) -> list[dict[str, Any]]:
    """The trainer's per-step log (all of it, also the steps before a resume)."""
    return [entry for entry in trainer.state.log_history if "step" in entry]


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
    plot_reward_curves(history, names, out_dir / "reward_curves.png")
    storage.write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


@dataclass(frozen=True)
class RlafResult:
    out_dir: Path
    summary: dict[str, Any]


def run(
    config: RunConfig,
    instructions_path: str | Path,
    out_dir: Path,
    *,
    workspace: Path,
    parent_run_id: str | None = None,
    on_step: StepCallback | None = None,
) -> RlafResult:
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
    deepspeed_config(settings.deepspeed)
    key = _run_key(config, instructions_path)
    checkpoint = resumable_checkpoint(out_dir, key, "stage2.max_steps")
    names = [component.scorer for component in settings.reward.components]
    composite = CompositeReward.from_settings(
        settings.reward, build_scorers(settings.scorers, names)
    )
    counted, seconds_before = totals_before(checkpoint)
    composite.totals.update(counted)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        storage.write_text(out_dir / RUN_KEY, json.dumps(key, indent=2) + "\n")
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
            [forwarding_callback(stage_run, on_step), totals_callback(composite, seconds_before)],
        )
        trainer.train(resume_from_checkpoint=checkpoint)
        _publish_adapter(trainer, out_dir, config.model.base)
        if not main:
            return RlafResult(out_dir, {})
        history = _log_history(trainer)
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
    return RlafResult(out_dir, summary)
