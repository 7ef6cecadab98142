"""Stage 3's join: the shards of one instance run become the dataset."""

from kfp import dsl

from components.images import RUNTIME_CPU


@dsl.component(base_image=RUNTIME_CPU, install_kfp_package=False)
def merge(
    shards: dsl.Input[list[dsl.Dataset]],
    dataset: dsl.Output[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
) -> float:
    """Writes the dataset (records, parquet, Alpaca JSON, card); returns the mean reward.

    Cached, so no MLflow parent run id input: the parent is found by
    ``REFINE_AF_PIPELINE_RUN``.
    """
    from pathlib import Path

    from refine_af import step
    from refine_af.stages import instances as stage

    result = stage.merge(
        [Path(shard.path) for shard in shards],
        Path(dataset.path),
        workspace=step.workspace(),
    )
    summary = result.summary
    mean_reward = summary["mean_reward"] if summary["mean_reward"] is not None else float("nan")
    counts = {name: summary[name] for name in ("instructions", "generations", "kept")}
    step.record_metrics(metrics, {**counts, "mean_reward": mean_reward})
    dataset.metadata.update({"policy": summary["policy"], "kept": summary["kept"]})
    return mean_reward
