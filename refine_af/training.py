"""What both training stages (2: RLAF, 4: SFT) share around a transformers trainer.

The DeepSpeed config lookup, the callback that forwards each log line to MLflow and the
progress display, checkpoints a killed run continues from (refusing those of another run),
and publishing the LoRA adapter so that it loads on any machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refine_af import launch, models, storage, tracking
from refine_af.config import PRESETS_DIR
from refine_af.errors import InputError

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
RUN_KEY = "run_key.json"
SECONDS_FILE = "refine_af_seconds.json"  # in each checkpoint: the time spent to reach it

StepCallback = Callable[[int, int, dict[str, float]], None]
"""(step, max steps, that step's metrics): the progress display's hook"""


def deepspeed_config(reference: str | None, setting: str) -> str | None:
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


def log_history(trainer) -> list[dict[str, Any]]:
    """The trainer's per-step log (all of it, also the steps before a resume)."""
    return [entry for entry in trainer.state.log_history if "step" in entry]


def _last_checkpoint(checkpoints: Path) -> str | None:
    """The newest complete checkpoint. The trainer writes a checkpoint's trainer state
    last, so one without it was cut by a kill while saving and cannot be resumed;
    transformers' ``get_last_checkpoint`` would pick it."""
    steps = {
        int(folder.name.removeprefix("checkpoint-")): folder
        for folder in checkpoints.glob("checkpoint-*")
        if folder.name.removeprefix("checkpoint-").isdigit()
        and (folder / "trainer_state.json").is_file()
    }
    return str(steps[max(steps)]) if steps else None


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


def train(trainer, checkpoint: str | None):
    """``trainer.train``, continuing from ``checkpoint``; returns its ``TrainOutput``.

    A checkpoint that already reached the run's last step is restored instead (adapter
    weights and trainer state): transformers' Trainer resumed from it takes one step past
    ``max_steps``, as it checks the limit only after the next step. Under DeepSpeed the
    trainer's engine exists only inside ``train``, so there it trains as before.
    """
    if checkpoint is None or trainer.is_deepspeed_enabled or not _finished(trainer, checkpoint):
        return trainer.train(resume_from_checkpoint=checkpoint)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    folder = Path(checkpoint)
    set_peft_model_state_dict(trainer.model, load_file(folder / "adapter_model.safetensors"))
    trainer.state = TrainerState.load_from_json(str(folder / "trainer_state.json"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    mean_loss = sum(losses) / len(losses) if losses else math.nan
    return TrainOutput(trainer.state.global_step, mean_loss, {})


def _finished(trainer, checkpoint: str) -> bool:
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    last = trainer.args.max_steps if trainer.args.max_steps > 0 else state["max_steps"]
    return state["global_step"] >= last > 0


def seconds_callback(seconds_before: float):
    """Save the seconds spent so far into every checkpoint, so the summary of a resumed
    run counts every invocation, not only the last."""
    from transformers import TrainerCallback

    started = time.monotonic()

    class SaveSeconds(TrainerCallback):
        def on_save(self, args, state, control, **kwargs) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                seconds = seconds_before + time.monotonic() - started
                storage.write_text(folder / SECONDS_FILE, json.dumps({"seconds": seconds}))

    return SaveSeconds()


def seconds_before(checkpoint: str | None) -> float:
    """The seconds saved with ``checkpoint`` (0 without one)."""
    path = Path(checkpoint or "") / SECONDS_FILE
    if checkpoint is None or not path.is_file():
        return 0.0
    return float(json.loads(path.read_text(encoding="utf-8"))["seconds"])


def write_run_key(out_dir: Path, key: dict[str, Any]) -> None:
    """Record what the checkpoints about to be written belong to (the main process only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    storage.write_text(out_dir / RUN_KEY, json.dumps(key, indent=2) + "\n")


def save_adapter(trainer, staging: Path, base_reference: str) -> bool:
    """Adapter + tokenizer in ``staging``, its config naming the base by its reference.

    Every process takes part (DeepSpeed gathers the weights); returns whether this is the
    main process, the one that wrote the folder.
    """
    if trainer.accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return False
    trainer.processing_class.save_pretrained(str(staging))
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle no loader needs
    name_base(staging, base_reference)
    return True


def name_base(adapter_dir: Path, base_reference: str) -> None:
    """Make an adapter's config name its base by reference, not this machine's cache path."""
    adapter_config = adapter_dir / models.ADAPTER_CONFIG
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = base_reference
    adapter_config.write_text(json.dumps(settings, indent=2) + "\n")


def publish(staging: Path, target: Path) -> None:
    """Swap a finished staging folder in for ``target``."""
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def staging_dir(out_dir: Path) -> Path:
    return out_dir / f".{ADAPTER_DIR}-staging"
