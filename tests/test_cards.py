"""Cards: Hub metadata as card data, and the text filled from a stage's summary."""

from __future__ import annotations

from huggingface_hub import DatasetCard, ModelCard

from refine_af import cards
from refine_af.config import load_config

SFT_SUMMARY = {
    "policy": "rl", "train_examples": 40, "dataset_sha256": "d" * 64, "eval_examples": 4,
    "eval_instructions": 2, "template": "chat", "steps": 20, "epochs": 2.0,
    "train_loss": 1.5, "eval_loss_before": 2.0, "eval_loss": 1.0, "config_hash": "c0ffee",
    "run_id": "run1", "registered_model": "m", "registered_version": "3",
}  # fmt: skip
DATASET_SUMMARY = {
    "kept": 12, "policy": "base", "model": "smollm2-135m-instruct", "min_reward": None,
    "reward": {"components": [{"scorer": "a", "weight": 1.0}, {"scorer": "b", "weight": 0.5}],
               "bias": 0.1},
    "instructions_with_examples": 5, "instructions": 7, "adapter": None,
    "instructions_sha256": "i" * 64, "dataset_sha256": "d" * 64, "samples_per_instruction": 3,
    "max_per_instruction": 2, "config_hash": "c0ffee", "generations": 30,
    "filtered": {"too_long": 3}, "quarantined": {},
}  # fmt: skip


def test_model_card_metadata_is_card_data_and_the_text_names_the_version() -> None:
    text = cards.model_card(SFT_SUMMARY, load_config("local-cpu"))
    card = ModelCard(text)
    assert card.data.base_model == "smollm2-135m-instruct" and card.data.library_name == "peft"
    assert card.data.tags == ["refine-af", "lora", "sft", "trl", "policy-rl"]
    assert "- registry: `m` version 3 (`models:/m/3`)" in text
    assert 'mlflow.pyfunc.load_model("models:/m/3")' in text
    assert "- LoRA r=8, alpha=16, dropout=0.05" in text and "- steps: 20 (2.0 epochs)" in text
    assert text.endswith("(base + adapter).\n")


def test_model_card_before_registration_has_no_load_snippet() -> None:
    config = load_config("local-cpu")
    numbered_later = cards.model_card({**SFT_SUMMARY, "registered_version": None}, config)
    assert (
        "- registry: a version of `m`\n" in numbered_later and "mlflow.pyfunc" not in numbered_later
    )
    unregistered = cards.model_card(
        {**SFT_SUMMARY, "registered_model": None, "registered_version": None}, config
    )
    assert "- registry: not registered\n\n## Use\n\nThis folder" in unregistered


def test_dataset_card_metadata_points_datasets_at_the_parquet_file() -> None:
    text = cards.dataset_card(DATASET_SUMMARY, None, "data/train-abc.parquet")
    card = DatasetCard(text)
    assert card.data.license == "apache-2.0" and card.data.size_categories == ["n<1K"]
    assert card.data.configs == [
        {
            "config_name": "default",
            "data_files": [{"split": "train", "path": "data/train-abc.parquet"}],
        }
    ]
    assert "- reward: 1.0 × a, 0.5 × b + 0.1" in text and "- minimum reward: none" in text
    assert "none (the base model wrote the instances: the baseline)" in text
    assert "| filtered | count |\n|---|---:|\n| too_long | 3 |\n\n## Licence" in text
    assert "| quarantined |" not in text


def test_dataset_card_names_the_adapter_and_a_custom_seed_file_by_its_name() -> None:
    adapter = {"sha256": "s" * 64, "uri": "s3://b/adapter", "mlflow_run_id": "run2"}
    summary = {**DATASET_SUMMARY, "policy": "rl", "adapter": adapter, "kept": 5000}
    text = cards.dataset_card(summary, "/home/me/seeds.jsonl", "data/train-abc.parquet")
    assert DatasetCard(text).data.license == "unknown"
    assert f"weights sha256 `{'s' * 64}`\n  - artifact: `s3://b/adapter`\n" in text
    assert "  - MLflow run of stage 2: `run2`\n" in text
    assert "a custom seed file, seeds.jsonl; its licence is not known here." in text
    assert "/home/me" not in text
