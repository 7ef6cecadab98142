"""First task of the pipeline: resolve the run configuration once, open the MLflow parent run."""

from typing import NamedTuple

from kfp import dsl

from components.images import RUNTIME_CPU


@dsl.component(base_image=RUNTIME_CPU, install_kfp_package=False)
def plan(
    config: str, overrides: list, base_model: str, shards: int, generation_endpoint: str = ""
) -> NamedTuple(
    "Plan",
    [("parent_run_id", str), ("config_hash", str), ("resolved_config", str)],
):
    """Fails the run before any stage when the config, an override or ``shards`` is bad.

    Returns the MLflow parent run id ("" under KFP's MLflow plugin), the config hash and
    the resolved configuration (YAML, every default filled in) that every later step runs.
    The pipeline registers its models (the gate reads them): ``stage4.register_model`` is
    set true.
    """
    from refine_af import step, tracking
    from refine_af.config import load_config

    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    run_config = load_config(
        config,
        [*overrides, "stage4.register_model=true"],
        base_model=base_model,
        generation_endpoint=generation_endpoint,
    )
    config_hash = run_config.config_hash()
    parent = tracking.open_pipeline_run(
        step.workspace(),
        {**run_config.to_dict(), "pipeline.shards": shards},
        {"refine_af.config_hash": config_hash},
    )
    return (parent, config_hash, run_config.to_yaml())
