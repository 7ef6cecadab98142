"""Stage 1 as a KFP component: bootstrap instructions from the seed tasks (Self-Instruct)."""

from kfp import dsl

from components.images import RUNTIME_GPU


@dsl.component(base_image=RUNTIME_GPU, install_kfp_package=False)
def instructions(
    config: str,
    overrides: list,
    base_model: str,
    parent_run_id: str,
    pool: dsl.Output[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
) -> int:
    """Writes the stage's output folder to ``pool``; returns the accepted count.

    Args:
        config: preset name or YAML text of the run configuration.
        overrides: ``section.key=value`` strings applied on top of it.
        parent_run_id: MLflow run of the pipeline run ("" for none).
    """
    import os
    from pathlib import Path

    from refine_af.config import load_config
    from refine_af.stages import instructions as stage

    os.environ["REFINE_AF_PARENT_RUN_ID"] = parent_run_id
    run_config = load_config(config, list(overrides), base_model=base_model)
    result = stage.execute(
        run_config,
        Path(pool.path),
        workspace=Path(os.environ.get("REFINE_AF_WORKSPACE", "/tmp/refine-af")),
    )
    summary = result.summary
    for name in ("candidates", "accepted", "rounds", "classification"):
        metrics.log_metric(name, summary[name])
    pool.metadata.update(
        {
            "config_hash": summary["config_hash"],
            "accepted": summary["accepted"],
            "mlflow_parent_run_id": parent_run_id,  # for the tasks of the shard loop
        }
    )
    return summary["accepted"]
