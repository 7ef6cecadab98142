"""Stage 3 as a KFP component: one shard of instance generation, scored by the reward."""

from kfp import dsl

from components.images import RUNTIME_GPU


@dsl.component(base_image=RUNTIME_GPU, install_kfp_package=False)
def instances(
    config: str,
    overrides: list,
    base_model: str,
    pool: dsl.Input[dsl.Dataset],
    shard: int,
    shards: int,
    examples: dsl.Output[dsl.Dataset],
    policy: dsl.Input[dsl.Model] = None,
    generation_endpoint: str = "",
):
    """Writes shard ``shard`` of ``shards`` to ``examples``; without ``policy``: the baseline.

    ``policy`` is stage 2's folder; its ``adapter/`` writes the instances (the RL policy).
    The MLflow parent run is found by ``REFINE_AF_PIPELINE_RUN``, outside the cache key.
    """
    import os
    from pathlib import Path

    from refine_af.config import load_config
    from refine_af.stages import instances as stage

    adapter = [f"stage3.adapter={Path(policy.path) / 'adapter'}"] if policy is not None else []
    run_config = load_config(
        config,
        [*overrides, *adapter],
        base_model=base_model,
        generation_endpoint=generation_endpoint,
    )
    result = stage.execute(
        run_config,
        Path(pool.path) / "instructions.jsonl",
        Path(examples.path),
        workspace=Path(os.environ.get("REFINE_AF_WORKSPACE", "/tmp/refine-af")),
        shard=stage.Shard(shard, shards),
        adapter_uri=f"{policy.uri.rstrip('/')}/adapter" if policy is not None else None,
    )
    examples.metadata.update({"policy": result.summary["policy"], "shard": f"{shard}/{shards}"})
