"""Trainer arguments: what each preset gives trl, and ``trainer_args`` passed through."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import cli_output

from refine_af import trainer_args, training
from refine_af.config import load_config, preset_names
from refine_af.errors import InputError
from refine_af.stages import rlaf, sft

CHECKPOINTS = Path("/ckpt")

# What each preset gave GRPOConfig and SFTConfig before stage2/stage4.trainer_args existed
# (captured from the code that built them field by field); "DS:zero2" is the DeepSpeed file.
_RUNTIME = {
    "output_dir": "/ckpt",
    "save_strategy": "steps",
    "report_to": "none",
    "disable_tqdm": True,
    "seed": 42,
    "save_total_limit": 2,
}
_PAPER_GRPO = {
    **_RUNTIME,
    "activation_checkpointing": True,
    "beta": 0.05,
    "bf16": True,
    "deepspeed": "DS:zero2",
    "gradient_accumulation_steps": 2,
    "learning_rate": 1e-05,
    "logging_steps": 1,
    "max_completion_length": 350,
    "max_steps": 500,
    "num_generations": 8,
    "per_device_train_batch_size": 16,
    "reward_weights": [0.0078, -0.4421, 0.3212, 0.152, 1.0],
    "save_steps": 50,
    "temperature": 1.0,
    "top_p": 1.0,
    "use_cpu": False,
}
_PAPER_SFT = {
    **_RUNTIME,
    "activation_checkpointing": True,
    "bf16": True,
    "completion_only_loss": True,
    "data_seed": 42,
    "deepspeed": "DS:zero2",
    "eval_strategy": "epoch",
    "gradient_accumulation_steps": 4,
    "learning_rate": 0.0002,
    "logging_steps": 10,
    "lr_scheduler_type": "cosine",
    "max_length": 1024,
    "max_steps": -1,
    "num_train_epochs": 3.0,
    "per_device_eval_batch_size": 8,
    "per_device_train_batch_size": 8,
    "save_steps": 50,
    "use_cpu": False,
    "warmup_steps": 0.03,
    "weight_decay": 0.0,
}
BEFORE = {
    "local-cpu": (
        {
            **_RUNTIME, "activation_checkpointing": False, "beta": 0.05, "bf16": False,
            "deepspeed": None, "gradient_accumulation_steps": 1, "learning_rate": 0.001,
            "logging_steps": 1, "max_completion_length": 48, "max_steps": 8,
            "num_generations": 2, "per_device_train_batch_size": 4,
            "reward_weights": [1.0, 1.0, 1.0, 1.0, 1.0], "save_steps": 4, "temperature": 0.9,
            "top_p": 1.0, "use_cpu": True,
        },
        {
            **_RUNTIME, "activation_checkpointing": False, "bf16": False,
            "completion_only_loss": True, "data_seed": 42, "deepspeed": None,
            "eval_strategy": "epoch", "gradient_accumulation_steps": 1, "learning_rate": 0.0002,
            "logging_steps": 1, "lr_scheduler_type": "cosine", "max_length": 256,
            "max_steps": -1, "num_train_epochs": 2.0, "per_device_eval_batch_size": 4,
            "per_device_train_batch_size": 4, "save_steps": 10, "use_cpu": True,
            "warmup_steps": 0.03, "weight_decay": 0.0,
        },
    ),
    "paper-llama2-13b": (
        _PAPER_GRPO,
        {**_PAPER_SFT, "gradient_accumulation_steps": 8, "per_device_eval_batch_size": 4,
         "per_device_train_batch_size": 4},
    ),
    "paper-llama2-7b": (_PAPER_GRPO, _PAPER_SFT),
    "paper-mistral-7b": (_PAPER_GRPO, _PAPER_SFT),
}  # fmt: skip


@pytest.fixture
def named_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DeepSpeed lookup without the deepspeed package: the bundled name, marked."""
    monkeypatch.setattr(
        training, "deepspeed_config", lambda ref, setting: None if ref is None else f"DS:{ref}"
    )


def _reward_weights(config) -> list[float]:
    return [c.weight for c in config.stage2.reward.components] + [1.0]


@pytest.mark.usefixtures("named_deepspeed")
@pytest.mark.parametrize("preset", sorted(BEFORE))
def test_every_preset_gives_trl_the_arguments_it_gave_before(preset: str) -> None:
    config = load_config(preset)
    grpo, sft_args = BEFORE[preset]
    assert rlaf.trainer_arguments(config, CHECKPOINTS, _reward_weights(config)) == grpo
    assert sft.trainer_arguments(config, CHECKPOINTS, True) == sft_args
    no_eval = sft.trainer_arguments(config, CHECKPOINTS, False)
    assert no_eval == {**sft_args, "eval_strategy": "no"}
    assert config.stage2.trainer_args == {} and config.stage4.trainer_args == {}


def test_every_preset_is_covered() -> None:
    assert sorted(BEFORE) == preset_names()


@pytest.mark.usefixtures("named_deepspeed")
def test_the_arguments_refine_af_sets_are_the_managed_ones() -> None:
    config = load_config("local-cpu")
    aliases = set(trainer_args.ALIASES)
    assert set(rlaf.trainer_arguments(config, CHECKPOINTS, [1.0])) == (
        set(trainer_args.MANAGED["stage2"]) - aliases
    )
    assert set(sft.trainer_arguments(config, CHECKPOINTS, True)) == (
        set(trainer_args.MANAGED["stage4"]) - aliases
    )


def test_trainer_args_reach_the_trl_config_beside_the_typed_settings() -> None:
    config = load_config(
        "local-cpu",
        [
            "stage2.trainer_args={scale_rewards: batch, loss_type: dr_grpo, epsilon: 0.3}",
            "stage4.trainer_args={packing: true}",
        ],
    )
    grpo = trainer_args.build(
        "grpo",
        rlaf.trainer_arguments(config, CHECKPOINTS, _reward_weights(config)),
        config.stage2.trainer_args,
        "stage2",
    )
    assert (grpo.scale_rewards, grpo.loss_type, grpo.epsilon) == ("batch", "dr_grpo", 0.3)
    assert (grpo.beta, grpo.max_steps, grpo.learning_rate) == (0.05, 8, 0.001)
    sft_config = trainer_args.build(
        "sft", sft.trainer_arguments(config, CHECKPOINTS, True), {"packing": True}, "stage4"
    )
    assert sft_config.packing and sft_config.max_length == 256


def test_a_value_trl_refuses_is_input_error() -> None:
    config = load_config("local-cpu", ["stage2.trainer_args={optim: no_such_optimizer}"])
    with pytest.raises(InputError, match="stage2: GRPOConfig refuses its arguments"):
        trainer_args.build(
            "grpo",
            rlaf.trainer_arguments(config, CHECKPOINTS, _reward_weights(config)),
            config.stage2.trainer_args,
            "stage2",
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "stage2.trainer_args={scale_reward: batch}",
            "stage2.trainer_args: Value error, scale_reward: GRPOConfig has no such argument; "
            "did you mean 'scale_rewards'?",
        ),
        ("stage2.trainer_args={beta: 0.1}", "beta: set it through stage2.kl_coef instead"),
        ("stage4.trainer_args={use_cpu: true}", "use_cpu: set it through model.device instead"),
        ("stage4.trainer_args={report_to: mlflow}", "report_to: refine-af sets it itself"),
        ("stage4.trainer_args={pack: true}", "pack: SFTConfig has no such argument"),
        (
            "stage2.trainer_args={gradient_checkpointing: true}",
            "gradient_checkpointing: set it through stage2.gradient_checkpointing instead",
        ),
    ],
)
def test_unknown_or_managed_trainer_args_exit_2_naming_key_and_class(
    monkeypatch: pytest.MonkeyPatch, capsys, override: str, message: str
) -> None:
    code, _, err = cli_output(monkeypatch, capsys, "config", "show", "--set", override)
    assert code == 2
    assert f"--set {override}" in err and message in err


def test_rloo_is_checked_against_its_own_config_class() -> None:
    with pytest.raises(InputError, match="loss_type: RLOOConfig has no such argument"):
        load_config("local-cpu", ["stage2.trainer=rloo", "stage2.trainer_args={loss_type: bnpo}"])
    config = load_config("local-cpu", ["stage2.trainer=rloo", "stage2.trainer_args={epsilon: 0.3}"])
    assert config.stage2.trainer_args == {"epsilon": 0.3}


def test_empty_trainer_args_leave_the_config_hash_as_it_was() -> None:
    """Runs and checkpoints of configs without trainer_args keep their hash and run key."""
    config = load_config("local-cpu")
    assert "trainer_args" not in config.to_dict()["stage2"]
    assert "trainer_args" not in config.to_dict()["stage4"]
    # Pinned: it changes only when a default changes (last: generation.endpoint.max_concurrency 32).
    assert config.config_hash() == "53b1123a0669"
    passed = load_config("local-cpu", ["stage2.trainer_args={epsilon: 0.3}"])
    assert passed.to_dict()["stage2"]["trainer_args"] == {"epsilon": 0.3}
    assert passed.config_hash() != config.config_hash()
