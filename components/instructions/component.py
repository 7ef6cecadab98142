"""Stage 1 as a KFP component: bootstrap instructions from the seed tasks (Self-Instruct)."""

from kfp import dsl

from components.images import RUNTIME_GPU


@dsl.component(base_image=RUNTIME_GPU, install_kfp_package=False)
def instructions(
    config: str,
    overrides: list,
    base_model: str,
    pool: dsl.Output[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    generation_endpoint: str = "",
) -> int:
    """Writes the stage's output folder to ``pool``; returns the accepted count.

    Args:
        config: preset name or YAML text of the run configuration.
        overrides: ``section.key=value`` strings applied on top of it.

    No MLflow parent run id among the inputs: it changes every run and would keep KFP's
    cache from ever hitting; the stage finds its parent by ``REFINE_AF_PIPELINE_RUN``.
    """
    import os
    from pathlib import Path

    from refine_af.config import load_config
    from refine_af.stages import instructions as stage

    run_config = load_config(
        config, list(overrides), base_model=base_model, generation_endpoint=generation_endpoint
    )
    result = stage.execute(
        run_config,
        Path(pool.path),
        workspace=Path(os.environ.get("REFINE_AF_WORKSPACE", "/tmp/refine-af")),
    )
    summary = result.summary
    for name in ("candidates", "accepted", "rounds", "classification"):
        metrics.log_metric(name, summary[name])
    pool.metadata.update({"config_hash": summary["config_hash"], "accepted": summary["accepted"]})
    return summary["accepted"]
