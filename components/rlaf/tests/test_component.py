"""The rlaf component, called as KFP calls it: accelerate launches the stage in a subprocess."""

import json
import os
from pathlib import Path

import pytest
from kfp import dsl
from test_instances import write_instructions
from test_rlaf import tiny_overrides

from components.rlaf.component import rlaf
from refine_af.config import load_config

ROOT = Path(__file__).parents[3]


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    """Stage 1's folder, and the outputs; the subprocess imports this tree."""
    monkeypatch.setenv("REFINE_AF_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    pool = dsl.Dataset(name="pool", uri=str(tmp_path / "pool"))
    Path(pool.path).mkdir()
    write_instructions(Path(pool.path) / "instructions.jsonl", 4)
    policy = dsl.Model(name="policy", uri=str(tmp_path / "policy"))
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    return pool, policy, metrics


def test_a_config_that_does_not_match_its_hash_stops_with_exit_2(artifacts, capsys):
    pool, policy, metrics = artifacts
    with pytest.raises(SystemExit) as stopped:
        rlaf.python_func(
            config=load_config("local-cpu").to_yaml(), config_hash="0" * 12, processes=1,
            pool=pool, policy=policy, metrics=metrics,
        )  # fmt: skip
    assert stopped.value.code == 2
    assert "not '000000000000' as recorded" in capsys.readouterr().err
    assert not Path(policy.path).exists()


@pytest.mark.slow
def test_trains_the_policy_adapter(artifacts, tiny_causal_lm_dir):
    pool, policy, metrics = artifacts
    config = load_config("local-cpu", tiny_overrides(tiny_causal_lm_dir, 1))
    rlaf.python_func(
        config=config.to_yaml(), config_hash=config.config_hash(), processes=1,
        pool=pool, policy=policy, metrics=metrics,
    )  # fmt: skip
    out = Path(policy.path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["config_hash"] == config.config_hash()
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_causal_lm_dir)
    assert (out / "reward.json").is_file() and (out / "metrics.jsonl").is_file()
    assert metrics.metadata["steps"] == 1
    assert policy.metadata == {"base_model": str(tiny_causal_lm_dir), "adapter": "adapter"}
