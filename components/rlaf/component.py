"""Stage 2 as a KFP component: train the instance-writing policy with RL from feedback."""

from kfp import dsl

from components.images import RUNTIME_GPU


@dsl.component(base_image=RUNTIME_GPU, install_kfp_package=False)
def rlaf(
    config: str,
    overrides: list,
    base_model: str,
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
    import os
    from pathlib import Path

    from refine_af import launch
    from refine_af.config import load_config

    run_config = load_config(config, list(overrides), base_model=base_model)
    out_dir = Path(policy.path)
    stage_args = [
        *("--instructions", str(Path(pool.path) / "instructions.jsonl")),
        *("--out", str(out_dir)),
        *launch.config_args(config, list(overrides), base_model),
        *("--workspace", os.environ.get("REFINE_AF_WORKSPACE", "/tmp/refine-af")),
    ]
    summary = launch.run_stage(processes, "rlaf", stage_args, out_dir)
    for name in ("steps", "reward_first5", "reward_last5"):
        if summary.get(name) is not None:
            metrics.log_metric(name, summary[name])
    policy.metadata.update({"base_model": run_config.model.base, "adapter": "adapter"})
