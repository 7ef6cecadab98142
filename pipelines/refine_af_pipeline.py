"""The REFINE-AF pipeline: one KFP v2 DAG for the local runner and for a GPU cluster.

seeds → instructions → rlaf → instances (ParallelFor over shards, RL policy) → merge →
sft → evaluate → promote; with ``run_baseline`` the same run builds the no-RL baseline
(instances with the base policy → merge → sft, registered with the ``baseline`` alias),
evaluate compares the two, and promote gates the RL model on the baseline and the champion.
"""

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
from pipelines import placement

ENDPOINTS_CONFIG_MAP = "refine-af-endpoints"
S3_SECRET = "refine-af-s3"
# Optional: a Hugging Face token for gated models (Llama-2); absent = anonymous downloads.
HF_SECRET = "refine-af-hf"
ENDPOINT_KEYS = (
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Argo labels every pod of a run with its workflow's name: one name per pipeline run, read
# at run time, so it names the MLflow parent run without entering KFP's cache key.
WORKFLOW_LABEL = "metadata.labels['workflows.argoproj.io/workflow']"
MODEL_CACHE_PATH = "/models"


def on_cluster(task: dsl.PipelineTask, size: str, *, cache: bool) -> dsl.PipelineTask:
    """The profile's image and resources, MLflow/S3 settings from the ConfigMap and Secret,
    the pipeline run's name, caching."""
    where = placement.active()
    need = where.size(size)
    task.set_container_image(where.image(gpu_step=False))
    task.set_cpu_request(need.cpu_request).set_cpu_limit(need.cpu_limit)
    task.set_memory_request(need.memory_request).set_memory_limit(need.memory_limit)
    task.set_caching_options(cache)
    kubernetes.use_config_map_as_env(task, ENDPOINTS_CONFIG_MAP, {k: k for k in ENDPOINT_KEYS})
    kubernetes.use_secret_as_env(task, S3_SECRET, {k: k for k in SECRET_KEYS})
    kubernetes.use_field_path_as_env(task, "REFINE_AF_PIPELINE_RUN", WORKFLOW_LABEL)
    return task


def on_gpu(task: dsl.PipelineTask, gpus=1) -> dsl.PipelineTask:
    """A model step: the HF token if there is one, the shared model cache if the placement
    names one; under the gpu profile also the GPU image, ``gpus`` accelerators, the GPU
    node selector and toleration, and a RAM-backed /dev/shm (NCCL and data loaders
    outgrow the container runtime's 64 MiB)."""
    kubernetes.use_secret_as_env(task, HF_SECRET, {"HF_TOKEN": "HF_TOKEN"}, optional=True)
    where = placement.active()
    if where.model_cache:  # a fixed claim name, so KFP's cache key stays the same
        kubernetes.mount_pvc(task, pvc_name=where.model_cache, mount_path=MODEL_CACHE_PATH)
        task.set_env_variable("HF_HOME", f"{MODEL_CACHE_PATH}/huggingface")
        task.set_env_variable("REFINE_AF_CACHE", f"{MODEL_CACHE_PATH}/refine-af")
    if not where.uses_gpus:
        return task
    key, value = where.gpu.node_selector()
    taint, effect = where.gpu.toleration_parts()
    task.set_container_image(where.image(gpu_step=True))
    task.set_accelerator_type(where.gpu.resource).set_accelerator_limit(gpus)
    kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_toleration(task, key=taint, operator="Exists", effect=effect)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    return task


def generates(task: dsl.PipelineTask, size: str, *, cache: bool) -> dsl.PipelineTask:
    """A step that generates with the base model: a model step, or under served generation
    a small CPU pod that sends its prompts to the endpoint."""
    if placement.active().served_generation:
        return on_cluster(task, "client", cache=cache)
    return on_gpu(on_cluster(task, size, cache=cache))


def processes(gpus):
    """Training processes per step: one per GPU, or one on the cpu profile."""
    return gpus if placement.active().uses_gpus else 1


def write_instances(pool, indices, shards, policy=None):
    """Stage 3 fanned out over the shards, then merged into one dataset. The shards read
    plan's configuration from ``pool``'s metadata: kfp 2.17's local runner hands a loop's
    tasks the loop item in place of every other task's output parameter."""
    with dsl.ParallelFor(indices) as shard:
        kwargs = {"policy": policy} if policy is not None else {}
        shard_task = instances(pool=pool, shard=shard, shards=shards, **kwargs)
        if policy is None:  # the base policy: the server's own model
            generates(shard_task, "shard", cache=True).set_retry(2)
        else:
            on_gpu(on_cluster(shard_task, "shard", cache=True)).set_retry(2)
    merged = merge(shards=dsl.Collected(shard_task.outputs["examples"]))
    on_cluster(merged, "merge", cache=True)
    return merged


def fine_tune(run, parent, dataset, gpus):
    """Stage 4, registered: the RL model and the baseline are both versions the gate reads."""
    task = sft(**run, parent_run_id=parent, processes=processes(gpus), dataset=dataset)
    return on_gpu(on_cluster(task, "train", cache=False), gpus)


def compare(run, parent, candidate, version, baseline=None, baseline_version=None):
    kwargs = {}
    if baseline is not None:
        kwargs = {"baseline": baseline, "baseline_version": baseline_version}
    task = evaluate(**run, parent_run_id=parent, candidate=candidate, version=version, **kwargs)
    return on_gpu(on_cluster(task, "generate", cache=False)).set_retry(2)


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
    return on_cluster(task, "light", cache=False)


def refine_af_dag(
    config: str = "local-cpu",
    overrides: list = [],  # noqa: B006 - KFP pipeline parameters take literal defaults
    base_model: str = "",
    shards: int = 2,
    run_baseline: bool = True,
    gpus: int = 1,
    generation_endpoint: str = "",
):
    """Args:
    config: preset name or YAML text of the run configuration.
    overrides: section.key=value overrides on top of it.
    base_model: model reference that replaces model.base ("" keeps the config's).
    shards: parallel instance-generation shards (at least 1).
    run_baseline: also build the no-RL baseline and compare with it.
    gpus: GPUs per training step (stages 2 and 4), one ``accelerate launch`` process each;
        the cpu profile trains in one process.
    generation_endpoint: OpenAI-compatible server (e.g. vLLM's /v1) that stages 1, 3 and 5
        send their prompts to; "" generates in-process.
    """
    planned = plan(
        config=config,
        overrides=overrides,
        base_model=base_model,
        shards=shards,
        generation_endpoint=generation_endpoint,
    )
    on_cluster(planned, "light", cache=False)
    # Every later step runs the configuration plan resolved, checked against its hash.
    run = {
        "config": planned.outputs["resolved_config"],
        "config_hash": planned.outputs["config_hash"],
    }
    parent = planned.outputs["parent_run_id"]
    fan_out = on_cluster(shard_indices(shards=shards), "tiny", cache=True)
    fan_out.after(planned)

    # Cached steps take no parent run id (see WORKFLOW_LABEL).
    stage1 = instructions(**run)
    generates(stage1, "generate", cache=True).set_retry(2)
    pool, kept = stage1.outputs["pool"], stage1.outputs["Output"]
    stage2 = rlaf(**run, processes=processes(gpus), pool=pool)
    on_gpu(on_cluster(stage2, "train", cache=True), gpus)

    rl_data = write_instances(pool, fan_out.output, shards, policy=stage2.outputs["policy"])
    rl_model = fine_tune(run, parent, rl_data.outputs["dataset"], gpus=gpus)
    version = rl_model.outputs["Output"]

    with dsl.If(run_baseline == True):  # noqa: E712 - a KFP condition, not a Python test
        base_data = write_instances(pool, fan_out.output, shards)
        base_model_task = fine_tune(run, parent, base_data.outputs["dataset"], gpus=gpus)
        compared = compare(
            run, parent, rl_model.outputs["model"], version,
            base_model_task.outputs["model"], base_model_task.outputs["Output"],
        )  # fmt: skip
        finish(
            run, parent, version, kept, rl_data.outputs["Output"],
            compared.outputs["Output"], base_data.outputs["Output"],
        )  # fmt: skip
    with dsl.Else():
        alone = compare(run, parent, rl_model.outputs["model"], version)
        finish(run, parent, version, kept, rl_data.outputs["Output"], alone.outputs["Output"])


def pipeline_for(where: placement.Placement):
    """The pipeline placed by ``where``. KFP builds the DAG when ``dsl.pipeline`` wraps the
    function, so each placement wraps it anew."""
    with placement.using(where):
        return dsl.pipeline(
            name="refine-af",
            description="REFINE-AF: Self-Instruct bootstrapping, RL from automated feedback, "
            "instance generation, SFT, SuperNI evaluation against the no-RL baseline, "
            "promotion.",
        )(refine_af_dag)


# The default placement: the gpu profile, images from REFINE_AF_IMAGE_REGISTRY / _TAG.
refine_af_pipeline = pipeline_for(placement.from_environment())
