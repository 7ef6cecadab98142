"""Trainer arguments passed through from the config to trl's config classes.

``stage2.trainer_args`` and ``stage4.trainer_args`` reach any field of trl's
``GRPOConfig``/``RLOOConfig``/``SFTConfig`` (``scale_rewards``, ``loss_type``,
``epsilon``…) without refine-af re-declaring it. The arguments refine-af sets itself come
from its typed settings (``MANAGED``: the typed setting to use instead, or None where
refine-af alone decides), so a key is set in one place only.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from refine_af.errors import InputError

TRL_CLASSES = {"grpo": "GRPOConfig", "rloo": "RLOOConfig", "sft": "SFTConfig"}

_SHARED = {
    "output_dir": None,
    "learning_rate": "learning_rate",
    "per_device_train_batch_size": "per_device_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "seed": "seed",
    "bf16": "bf16",
    "activation_checkpointing": "gradient_checkpointing",
    "deepspeed": "deepspeed",
    "use_cpu": "model.device",
    "save_strategy": None,
    "save_steps": "save_steps",
    "save_total_limit": "save_total_limit",
    "report_to": None,
    "disable_tqdm": None,
}
# trl fields that mean what a field refine-af sets means (an older name of it)
ALIASES = {"gradient_checkpointing": "gradient_checkpointing"}
MANAGED: dict[str, dict[str, str | None]] = {
    "stage2": {
        **_SHARED,
        **ALIASES,
        "max_steps": "max_steps",
        "num_generations": "num_generations",
        "max_completion_length": "max_completion_length",
        "temperature": "temperature",
        "top_p": "top_p",
        "beta": "kl_coef",
        "reward_weights": "reward",
        "logging_steps": None,
    },
    "stage4": {
        **_SHARED,
        **ALIASES,
        "num_train_epochs": "num_train_epochs",
        "max_steps": "max_steps",
        "lr_scheduler_type": "lr_scheduler",
        "warmup_steps": "warmup_ratio",
        "weight_decay": "weight_decay",
        "per_device_eval_batch_size": "per_device_batch_size",
        "max_length": "max_length",
        "completion_only_loss": None,
        "data_seed": "seed",
        "eval_strategy": "eval_fraction",
        "logging_steps": "logging_steps",
    },
}


def trl_config_class(trainer: str) -> type:
    """trl's config class for ``trainer`` (grpo, rloo, sft); imports trl."""
    import trl

    return getattr(trl, TRL_CLASSES[trainer])


def check(arguments: dict[str, Any], section: str, trainer: str) -> None:
    """Refuse keys the trl class does not have, and keys refine-af sets from its settings.

    Raises ValueError (the config loader turns it into an error naming the file or
    ``--set`` that gave the key); trl itself is imported only when there are arguments.
    """
    if not arguments:
        return
    config_class = trl_config_class(trainer)
    fields = sorted(f.name for f in dataclasses.fields(config_class) if f.init)
    for key in arguments:
        if key in MANAGED[section]:
            typed = MANAGED[section][key]
            if typed is None:
                raise ValueError(f"{key}: refine-af sets it itself")
            owner = typed if "." in typed else f"{section}.{typed}"
            raise ValueError(f"{key}: set it through {owner} instead")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{key}: {config_class.__name__} has no such argument{hint}")


def build(trainer: str, managed: dict[str, Any], extra: dict[str, Any], section: str):
    """trl's config object from refine-af's arguments and the passed-through ones.

    A value trl refuses is bad input, reported with the section it came from.
    """
    config_class = trl_config_class(trainer)
    try:
        return config_class(**managed, **extra)
    except (TypeError, ValueError) as error:
        raise InputError(
            f"{section}: {config_class.__name__} refuses its arguments: {error}"
        ) from error
