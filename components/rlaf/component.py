"""Stage 2 as a KFP component: train the instance-writing policy with RL from feedback."""

from kfp import dsl

from components.images import RUNTIME_GPU


@dsl.component(base_image=RUNTIME_GPU, install_kfp_package=False)
def rlaf(
    config: str,
    config_hash: str,
    processes: int,
    pool: dsl.Input[dsl.Dataset],
    policy: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
):
    """Writes stage 2's folder (LoRA ``adapter/``, reward curves, summary) to ``policy``.

    Trains under ``accelerate launch --num_processes processes`` (one per GPU), so the
    presets' DeepSpeed configs get the distributed environment they need. Cached: no MLflow
    parent run id among the inputs (it changes every run); the stage finds its parent by
    ``REFINE_AF_PIPELINE_RUN``, so a rerun of the pipeline reuses a trained policy.
    """
    from pathlib import Path

    from refine_af import launch, step

    run_config = step.config(config, config_hash)  # a mismatch stops before the launch
    out_dir = Path(policy.path)
    stage_args = [
        *("--instructions", str(Path(pool.path) / "instructions.jsonl")),
        *("--out", str(out_dir)),
        *launch.stage_args(config, config_hash, step.workspace()),
    ]
    summary = launch.run_stage(processes, "rlaf", stage_args, out_dir)
    names = ("steps", "reward_first5", "reward_last5")
    step.record_metrics(metrics, {n: summary[n] for n in names if summary.get(n) is not None})
    policy.metadata.update({"base_model": run_config.model.base, "adapter": "adapter"})
