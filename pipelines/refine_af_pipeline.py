"""The REFINE-AF pipeline: one KFP v2 DAG for the local runner and for a GPU cluster.

seeds → instructions → rlaf → instances (ParallelFor over shards, RL policy) → merge →
sft → evaluate → promote; with ``run_baseline`` the same run builds the no-RL baseline
(instances with the base policy → merge → sft) and evaluate compares the two.
"""

import os

from kfp import dsl, kubernetes

from components.evaluate.component import evaluate
from components.instances.component import instances
from components.instructions.component import instructions
from components.merge.component import merge
from components.plan.component import plan
from components.promote.component import promote
from components.rlaf.component import rlaf
from components.sft.component import sft
from components.shards.component import shard_indices

# Where GPU steps go; compile-time settings so the compiled YAML is self-describing.
GPU_NODE_LABEL = os.environ.get("REFINE_AF_GPU_NODE_LABEL", "nvidia.com/gpu.present=true")
GPU_RESOURCE = "nvidia.com/gpu"
ENDPOINTS_CONFIG_MAP = "refine-af-endpoints"
S3_SECRET = "refine-af-s3"
ENDPOINT_KEYS = (
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def on_cluster(task: dsl.PipelineTask, *, cpu: str, memory: str, cache: bool) -> dsl.PipelineTask:
    """Resources, MLflow/S3 settings from the ConfigMap and Secret, caching."""
    task.set_cpu_request(cpu).set_cpu_limit(cpu)
    task.set_memory_request(memory).set_memory_limit(memory)
    task.set_caching_options(cache)
    kubernetes.use_config_map_as_env(task, ENDPOINTS_CONFIG_MAP, {k: k for k in ENDPOINT_KEYS})
    kubernetes.use_secret_as_env(task, S3_SECRET, {k: k for k in SECRET_KEYS})
    return task


def on_gpu(task: dsl.PipelineTask, gpus: int = 1) -> dsl.PipelineTask:
    """An accelerator, the GPU node selector and the toleration GPU nodes carry."""
    key, _, value = GPU_NODE_LABEL.partition("=")
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
    kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    return task


def write_instances(run, parent, pool, indices, shards, policy=None):
    """Stage 3 fanned out over the shards, then merged into one dataset."""
    with dsl.ParallelFor(indices) as shard:
        kwargs = {"policy": policy} if policy is not None else {}
        shard_task = instances(**run, pool=pool, shard=shard, shards=shards, **kwargs)
        on_gpu(on_cluster(shard_task, cpu="8", memory="48Gi", cache=True)).set_retry(2)
    merged = merge(parent_run_id=parent, shards=dsl.Collected(shard_task.outputs["examples"]))
    on_cluster(merged, cpu="2", memory="4Gi", cache=True)
    return merged


def fine_tune(run, parent, dataset, register: bool):
    task = sft(**run, parent_run_id=parent, register=register, dataset=dataset)
    return on_gpu(on_cluster(task, cpu="8", memory="64Gi", cache=False))


def compare(run, parent, candidate, version, baseline=None):
    kwargs = {"baseline": baseline} if baseline is not None else {}
    task = evaluate(**run, parent_run_id=parent, candidate=candidate, version=version, **kwargs)
    return on_gpu(on_cluster(task, cpu="8", memory="32Gi", cache=False)).set_retry(2)


def finish(run, parent, version, kept, rl_reward, improved, base_reward=None):
    baseline = {"base_mean_reward": base_reward} if base_reward is not None else {}
    task = promote(
        **run,
        parent_run_id=parent,
        version=version,
        instructions_kept=kept,
        rl_mean_reward=rl_reward,
        pct_tasks_improved=improved,
        **baseline,
    )
    return on_cluster(task, cpu="1", memory="2Gi", cache=False)


@dsl.pipeline(
    name="refine-af",
    description="REFINE-AF: Self-Instruct bootstrapping, RL from automated feedback, "
    "instance generation, SFT, SuperNI evaluation against the no-RL baseline, promotion.",
)
def refine_af_pipeline(
    config: str = "local-cpu",
    overrides: list = [],  # noqa: B006 - KFP pipeline parameters take literal defaults
    base_model: str = "",
    shards: int = 2,
    run_baseline: bool = True,
):
    """Args:
    config: preset name or YAML text of the run configuration.
    overrides: section.key=value overrides on top of it.
    base_model: model reference that replaces model.base ("" keeps the config's).
    shards: parallel instance-generation shards (at least 1).
    run_baseline: also build the no-RL baseline and compare with it.
    """
    run = {"config": config, "overrides": overrides, "base_model": base_model}
    planned = on_cluster(plan(**run, shards=shards), cpu="1", memory="1Gi", cache=False)
    parent = planned.outputs["parent_run_id"]
    fan_out = on_cluster(shard_indices(shards=shards), cpu="100m", memory="256Mi", cache=True)
    fan_out.after(planned)

    stage1 = instructions(**run, parent_run_id=parent)
    on_gpu(on_cluster(stage1, cpu="8", memory="32Gi", cache=True)).set_retry(2)
    pool, kept = stage1.outputs["pool"], stage1.outputs["Output"]
    stage2 = rlaf(**run, parent_run_id=parent, pool=pool)
    on_gpu(on_cluster(stage2, cpu="8", memory="64Gi", cache=False))

    rl_data = write_instances(
        run, parent, pool, fan_out.output, shards, policy=stage2.outputs["policy"]
    )
    rl_model = fine_tune(run, parent, rl_data.outputs["dataset"], register=True)
    version = rl_model.outputs["Output"]

    with dsl.If(run_baseline == True):  # noqa: E712 - a KFP condition, not a Python test
        base_data = write_instances(run, parent, pool, fan_out.output, shards)
        base_model_task = fine_tune(run, parent, base_data.outputs["dataset"], register=False)
        compared = compare(
            run, parent, rl_model.outputs["model"], version, base_model_task.outputs["model"]
        )
        finish(
            run, parent, version, kept, rl_data.outputs["Output"],
            compared.outputs["Output"], base_data.outputs["Output"],
        )  # fmt: skip
    with dsl.Else():
        alone = compare(run, parent, rl_model.outputs["model"], version)
        finish(run, parent, version, kept, rl_data.outputs["Output"], alone.outputs["Output"])
