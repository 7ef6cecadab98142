"""Stage 1 as a KFP component: bootstrap instructions from the seed tasks (Self-Instruct)."""

from kfp import dsl

from components.images import RUNTIME_GPU


@dsl.component(base_image=RUNTIME_GPU, install_kfp_package=False)
def instructions(
    config: str,
    config_hash: str,
    pool: dsl.Output[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
) -> int:
    """Writes the stage's output folder to ``pool``, the configuration and its hash to its
    metadata; returns the accepted count.

    Args:
        config: the resolved configuration (YAML) that plan returned.
        config_hash: plan's hash of it; a config that does not match stops the step.

    No MLflow parent run id among the inputs: it changes every run and would keep KFP's
    cache from ever hitting; the stage finds its parent by ``REFINE_AF_PIPELINE_RUN``.
    """
    from pathlib import Path

    from refine_af import step
    from refine_af.stages import instructions as stage

    result = stage.execute(
        step.config(config, config_hash), Path(pool.path), workspace=step.workspace()
    )
    summary = result.summary
    names = ("candidates", "accepted", "rounds", "classification")
    step.record_metrics(metrics, {name: summary[name] for name in names})
    # The instance shards read the configuration here: see components/instances/README.md.
    pool.metadata.update(
        {"config": config, "config_hash": config_hash, "accepted": summary["accepted"]}
    )
    return summary["accepted"]
