"""The sft component, called as KFP calls it: accelerate launches the stage in a subprocess."""

import json
import os
from pathlib import Path

import pytest
from kfp import dsl
from test_sft import example_rows, write_rows

from components.sft.component import sft
from refine_af.config import load_config

ROOT = Path(__file__).parents[3]


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    """The examples as merge leaves them, and the outputs; the subprocess imports this tree."""
    monkeypatch.setenv("REFINE_AF_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    dataset = dsl.Dataset(name="dataset", uri=str(tmp_path / "dataset"))
    Path(dataset.path).mkdir()
    write_rows(Path(dataset.path) / "examples.jsonl", example_rows())
    model = dsl.Model(name="model", uri=str(tmp_path / "model"))
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    return dataset, model, metrics


def test_a_config_that_does_not_match_its_hash_stops_with_exit_2(artifacts, capsys):
    dataset, model, metrics = artifacts
    with pytest.raises(SystemExit) as stopped:
        sft.python_func(
            config=load_config("local-cpu").to_yaml(), config_hash="0" * 12, parent_run_id="",
            processes=1, dataset=dataset, model=model, metrics=metrics,
        )  # fmt: skip
    assert stopped.value.code == 2
    assert "not '000000000000' as recorded" in capsys.readouterr().err
    assert not Path(model.path).exists()


@pytest.mark.slow
def test_trains_registers_and_returns_the_version(artifacts, tiny_causal_lm_dir):
    dataset, model, metrics = artifacts
    config = load_config(
        "local-cpu",
        [
            "stage4.max_steps=1",
            "stage4.per_device_batch_size=2",
            "stage4.max_length=64",
            "stage4.lora.r=4",
            "stage4.lora.target_modules=[q_proj, v_proj]",
            "stage6.model_name=comp-sft-test",
        ],
        base_model=str(tiny_causal_lm_dir),
    )
    version = sft.python_func(
        config=config.to_yaml(), config_hash=config.config_hash(), parent_run_id="",
        processes=1, dataset=dataset, model=model, metrics=metrics,
    )  # fmt: skip
    out = Path(model.path)
    summary = json.loads((out / "summary.json").read_text())
    assert version == summary["registered_version"] == "1"
    assert summary["steps"] == 1 and summary["config_hash"] == config.config_hash()
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_causal_lm_dir)
    assert metrics.metadata["train_examples"] == summary["train_examples"] > 0
    assert metrics.metadata["eval_examples"] == summary["eval_examples"] > 0
    assert metrics.metadata["eval_loss"] == pytest.approx(summary["eval_loss"])
    assert model.metadata == {"base_model": str(tiny_causal_lm_dir)}
