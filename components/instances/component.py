"""Stage 3 as a KFP component: one shard of instance generation, scored by the reward."""

from kfp import dsl

from components.images import RUNTIME_GPU


@dsl.component(base_image=RUNTIME_GPU, install_kfp_package=False)
def instances(
    pool: dsl.Input[dsl.Dataset],
    shard: int,
    shards: int,
    examples: dsl.Output[dsl.Dataset],
    policy: dsl.Input[dsl.Model] = None,
):
    """Writes shard ``shard`` of ``shards`` to ``examples``; without ``policy``: the baseline.

    ``policy`` is stage 2's folder; its ``adapter/`` writes the instances (the RL policy)
    and becomes the configuration's ``stage3.adapter``. The configuration is plan's, as
    ``pool``'s metadata carries it (``config``, ``config_hash``), checked by its hash. The
    MLflow parent run is found by ``REFINE_AF_PIPELINE_RUN``, outside the cache key.
    """
    from pathlib import Path

    from refine_af import step
    from refine_af.stages import instances as stage

    run_config = step.config(pool.metadata.get("config", ""), pool.metadata.get("config_hash", ""))
    if policy is not None:
        adapter = str(Path(policy.path) / "adapter")
        stage3 = run_config.stage3.model_copy(update={"adapter": adapter})
        run_config = run_config.model_copy(update={"stage3": stage3})
    result = stage.execute(
        run_config,
        Path(pool.path) / "instructions.jsonl",
        Path(examples.path),
        workspace=step.workspace(),
        shard=stage.Shard(shard, shards),
        adapter_uri=f"{policy.uri.rstrip('/')}/adapter" if policy is not None else None,
    )
    examples.metadata.update({"policy": result.summary["policy"], "shard": f"{shard}/{shards}"})
