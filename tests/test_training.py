"""Resuming a training stage from its checkpoints (refine_af.training), on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refine_af import training


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.arange(i, i + 8) % 64
        return {"input_ids": ids, "labels": ids}


def _trainer(out: Path, callbacks=()):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))
    args = TrainingArguments(str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=0.1, logging_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True)  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=list(callbacks))


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora" in k}


def test_a_finished_run_resumed_from_its_last_checkpoint_takes_no_extra_step(tmp_path) -> None:
    """transformers' Trainer resumed from the last checkpoint takes step max_steps + 1;
    training.train restores that checkpoint instead, weights and log included."""
    first = _trainer(tmp_path, [training.seconds_callback(5.0)])
    first.train()
    trained = _lora(first)
    last = str(tmp_path / "checkpoint-4")
    assert training.seconds_before(last) >= 5.0  # earlier invocations' time carried on

    again = _trainer(tmp_path)
    output = training.train(again, last)
    assert again.state.global_step == output.global_step == 4
    assert all(torch.equal(trained[k], v) for k, v in _lora(again).items())
    assert output.training_loss == pytest.approx(
        sum(e["loss"] for e in first.state.log_history if "loss" in e) / 4
    )

    # from a checkpoint before the end it trains on, to exactly max_steps
    resumed = _trainer(tmp_path)
    training.train(resumed, str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4


def test_seconds_before_without_a_checkpoint_is_zero(tmp_path) -> None:
    assert training.seconds_before(None) == 0.0
    assert training.seconds_before(str(tmp_path)) == 0.0
