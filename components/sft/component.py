"""Stage 4 as a KFP component: LoRA fine-tuning on the dataset, registered in MLflow."""

from kfp import dsl

from components.images import RUNTIME_GPU


@dsl.component(base_image=RUNTIME_GPU, install_kfp_package=False)
def sft(
    config: str,
    config_hash: str,
    parent_run_id: str,
    processes: int,
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
) -> str:
    """Writes the adapter folder to ``model``; returns the registered version ("" if none).

    Trains under ``accelerate launch --num_processes processes`` (one per GPU).
    """
    from pathlib import Path

    from refine_af import launch, step

    run_config = step.config(config, config_hash)  # a mismatch stops before the launch
    out_dir = Path(model.path)
    stage_args = [
        *("--examples", str(Path(dataset.path) / "examples.jsonl")),
        *("--out", str(out_dir)),
        *launch.stage_args(config, config_hash, step.workspace(), parent_run_id),
    ]
    summary = launch.run_stage(processes, "sft", stage_args, out_dir)
    names = ("train_examples", "eval_examples", "eval_loss")
    step.record_metrics(metrics, {n: summary[n] for n in names if summary.get(n) is not None})
    model.metadata.update({"base_model": run_config.model.base})
    return summary["registered_version"] or ""
