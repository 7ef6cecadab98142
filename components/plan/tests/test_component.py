"""plan, called as KFP calls it: the configuration resolved once, the parent run opened."""

import pytest

from components.plan.component import plan
from refine_af import tracking
from refine_af.config import load_resolved
from refine_af.errors import InputError


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINE_AF_WORKSPACE", str(tmp_path / "ws"))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", tracking.PIPELINE_RUN_ENV):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "ws"


def test_resolves_the_config_once_and_opens_the_parent_run(workspace):
    parent, config_hash, resolved = plan.python_func(
        config="local-cpu",
        overrides=["stage1.num_instructions=3", "stage4.register_model=false"],
        base_model="my/model",
        shards=2,
        generation_endpoint="http://127.0.0.1:9/v1",
    )
    config = load_resolved(resolved, config_hash)  # what every later step runs
    assert config.stage1.num_instructions == 3 and config.model.base == "my/model"
    assert config.generation.backend == "openai"
    assert config.generation.endpoint.base_url == "http://127.0.0.1:9/v1"
    assert config.stage4.register_model  # the pipeline's gate reads registered versions
    run = tracking.connect(workspace).get_run(parent)
    assert run.data.tags["refine_af.config_hash"] == config_hash
    assert run.data.params["pipeline.shards"] == "2"
    assert run.data.params["stage1.num_instructions"] == "3"


def test_bad_input_stops_the_run_before_any_stage(workspace):
    with pytest.raises(ValueError, match="shards must be at least 1"):
        plan.python_func(config="local-cpu", overrides=[], base_model="", shards=0)
    with pytest.raises(InputError, match=r"unknown config key stage1\.nope"):
        plan.python_func(config="local-cpu", overrides=["stage1.nope=1"], base_model="", shards=1)
    assert not workspace.exists()
