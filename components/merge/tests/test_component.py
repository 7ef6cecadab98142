"""The merge component, called as KFP calls it, on shards a fake model wrote."""

import json
from pathlib import Path

import pytest
from kfp import dsl
from test_instances import SeededWriter, fake_reward, stage_config, write_instructions

from components.merge.component import merge
from refine_af.errors import InputError
from refine_af.stages import instances


@pytest.fixture
def shards(tmp_path, monkeypatch) -> list[dsl.Dataset]:
    """Two shards of one stage 3 run, as the instances component leaves them."""
    monkeypatch.setenv("REFINE_AF_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = stage_config()
    instructions_file = write_instructions(tmp_path / "instructions.jsonl", 5)
    folders = []
    for index in range(2):
        folder = dsl.Dataset(name="examples", uri=str(tmp_path / f"shard-{index}"))
        instances.run(
            config, instructions_file, Path(folder.path), SeededWriter(), fake_reward(config),
            workspace=tmp_path / "ws", shard=instances.Shard(index, 2),
        )  # fmt: skip
        folders.append(folder)
    return folders


def outputs(tmp_path: Path) -> tuple[dsl.Dataset, dsl.Metrics]:
    return (
        dsl.Dataset(name="dataset", uri=str(tmp_path / "dataset")),
        dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics")),
    )


def test_writes_the_dataset_and_returns_the_mean_reward(shards, tmp_path):
    dataset, metrics = outputs(tmp_path)
    mean_reward = merge.python_func(shards=shards, dataset=dataset, metrics=metrics)
    folder = Path(dataset.path)
    summary = json.loads((folder / "summary.json").read_text())
    for name in ("examples.jsonl", "alpaca.json", "dataset/README.md", "summary.json"):
        assert (folder / name).is_file(), name
    kept = sum(1 for _ in (folder / "examples.jsonl").open())
    assert summary["kept"] == kept > 0 and summary["instructions"] == 5  # seeds are not sampled
    assert mean_reward == pytest.approx(summary["mean_reward"])
    assert metrics.metadata["mean_reward"] == pytest.approx(mean_reward)
    assert metrics.metadata["kept"] == kept
    assert metrics.metadata["generations"] == summary["generations"] == 5 * 4
    # a file at the Metrics output's path: kfp.local's cache skips steps with one missing
    assert json.loads(Path(metrics.path).read_text()) == pytest.approx(metrics.metadata)
    assert dataset.metadata == {"policy": "base", "kept": kept}


def test_a_missing_shard_stops_before_writing(shards, tmp_path):
    dataset, metrics = outputs(tmp_path)
    with pytest.raises(InputError, match=r"shards 0..1 once each; got \[1\]"):
        merge.python_func(shards=shards[1:], dataset=dataset, metrics=metrics)
    assert not Path(dataset.path).exists()
    assert metrics.metadata == {}
