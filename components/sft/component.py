"""Stage 4 as a KFP component: LoRA fine-tuning on the dataset, registered in MLflow."""

from kfp import dsl

from components.images import RUNTIME_GPU


@dsl.component(base_image=RUNTIME_GPU, install_kfp_package=False)
def sft(
    config: str,
    overrides: list,
    base_model: str,
    parent_run_id: str,
    register: bool,
    processes: int,
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
) -> str:
    """Writes the adapter folder to ``model``; returns the registered version ("" if none).

    Trains under ``accelerate launch --num_processes processes`` (one per GPU).
    """
    import os
    from pathlib import Path

    from refine_af import launch
    from refine_af.config import load_config

    os.environ["REFINE_AF_PARENT_RUN_ID"] = parent_run_id
    step_overrides = [*overrides, f"stage4.register_model={register}"]
    run_config = load_config(config, step_overrides, base_model=base_model)
    out_dir = Path(model.path)
    stage_args = [
        *("--examples", str(Path(dataset.path) / "examples.jsonl")),
        *("--out", str(out_dir)),
        *launch.config_args(config, step_overrides, base_model),
        *("--workspace", os.environ.get("REFINE_AF_WORKSPACE", "/tmp/refine-af")),
    ]
    summary = launch.run_stage(processes, "sft", stage_args, out_dir)
    for name in ("train_examples", "eval_examples", "eval_loss"):
        if summary.get(name) is not None:
            metrics.log_metric(name, summary[name])
    model.metadata.update({"base_model": run_config.model.base})
    return summary["registered_version"] or ""
