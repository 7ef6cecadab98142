"""The instances component, called as KFP calls it, on a tiny random model."""

import json
from pathlib import Path

import pytest
from kfp import dsl
from test_instances import write_instructions
from test_rlaf import tiny_overrides

from components.instances.component import instances
from refine_af.config import load_config


def pool_for(tmp_path: Path, config_yaml: str, config_hash: str) -> dsl.Dataset:
    """Stage 1's folder as the instructions component leaves it: the file and plan's config."""
    pool = dsl.Dataset(name="pool", uri=str(tmp_path / "pool"))
    Path(pool.path).mkdir()
    write_instructions(Path(pool.path) / "instructions.jsonl", 4)
    pool.metadata.update({"config": config_yaml, "config_hash": config_hash})
    return pool


@pytest.fixture
def examples(tmp_path, monkeypatch) -> dsl.Dataset:
    monkeypatch.setenv("REFINE_AF_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return dsl.Dataset(name="examples", uri=str(tmp_path / "examples"))


def test_a_config_that_does_not_match_its_hash_stops_with_exit_2(examples, tmp_path, capsys):
    pool = pool_for(tmp_path, load_config("local-cpu").to_yaml(), "0" * 12)
    with pytest.raises(SystemExit) as stopped:
        instances.python_func(pool=pool, shard=0, shards=1, examples=examples)
    assert stopped.value.code == 2
    assert "not '000000000000' as recorded" in capsys.readouterr().err
    assert not Path(examples.path).exists()


@pytest.mark.slow
def test_writes_one_shard_with_the_base_policy(examples, tmp_path, tiny_causal_lm_dir):
    overrides = [
        *tiny_overrides(tiny_causal_lm_dir, 1),
        "stage3.max_new_tokens=8",
        "generation.batch_size=2",  # a block: one instruction's 2 samples
    ]
    config = load_config("local-cpu", overrides)
    pool = pool_for(tmp_path, config.to_yaml(), config.config_hash())
    instances.python_func(pool=pool, shard=1, shards=2, examples=examples)
    folder = Path(examples.path)
    shard = json.loads((folder / "shard.json").read_text())
    assert shard["config_hash"] == config.config_hash()
    assert (shard["shard"], shard["shards"], shard["policy"]) == (1, 2, "base")
    written = [
        json.loads(line)
        for name in ("examples.jsonl", "filtered.jsonl", "quarantine.jsonl")
        for line in (folder / name).read_text().splitlines()
    ]
    # the second half of 4 machine instructions, 2 samples each, all accounted for
    assert sorted(row["id"] for row in written) == [
        f"machine_{k:06d}-{s:03d}" for k in (2, 3) for s in (0, 1)
    ]
    assert examples.metadata == {"policy": "base", "shard": "1/2"}
