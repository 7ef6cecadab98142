"""The instructions component, called as KFP calls it, with real artifact objects."""

import json
from pathlib import Path

import pytest
from kfp import dsl

from components.instructions.component import instructions
from refine_af.config import load_config

TINY = [
    "stage1.num_instructions=2",
    "stage1.max_rounds=2",
    "stage1.prompts_per_round=2",
    "stage1.max_new_tokens=12",
    "stage1.detect_classification=false",
]


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINE_AF_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pool = dsl.Dataset(name="pool", uri=str(tmp_path / "pool"))
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    return pool, metrics


def test_a_config_that_does_not_match_its_hash_stops_with_exit_2(outputs, capsys):
    pool, metrics = outputs
    config = load_config("local-cpu").to_yaml()
    with pytest.raises(SystemExit) as stopped:
        instructions.python_func(config=config, config_hash="0" * 12, pool=pool, metrics=metrics)
    assert stopped.value.code == 2
    assert "not '000000000000' as recorded" in capsys.readouterr().err
    assert not Path(pool.path).exists()


def test_writes_the_stage_folder_and_metrics(outputs, tiny_causal_lm_dir):
    pool, metrics = outputs
    config = load_config("local-cpu", TINY, base_model=str(tiny_causal_lm_dir))
    accepted = instructions.python_func(
        config=config.to_yaml(), config_hash=config.config_hash(), pool=pool, metrics=metrics
    )
    folder = Path(pool.path)
    summary = json.loads((folder / "summary.json").read_text())
    assert accepted == summary["accepted"] == metrics.metadata["accepted"]
    assert summary["rounds"] == 2 or summary["reached_target"]
    assert {p.name for p in folder.iterdir()} >= {
        "instructions.jsonl",
        "filtered.jsonl",
        "quarantine.jsonl",
        "summary.json",
    }
    assert pool.metadata["config_hash"] == summary["config_hash"] == config.config_hash()
    assert pool.metadata["config"] == config.to_yaml()  # for the instance shards
