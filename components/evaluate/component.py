"""Stage 5 as a KFP component: SuperNI ROUGE-L of the candidate, compared with the baseline."""

from kfp import dsl

from components.images import RUNTIME_GPU


@dsl.component(base_image=RUNTIME_GPU, install_kfp_package=False)
def evaluate(
    config: str,
    config_hash: str,
    parent_run_id: str,
    candidate: dsl.Input[dsl.Model],
    version: str,
    results: dsl.Output[dsl.Dataset],
    report: dsl.Output[dsl.Markdown],
    metrics: dsl.Output[dsl.Metrics],
    baseline: dsl.Input[dsl.Model] = None,
    baseline_version: str = "",
) -> float:
    """Evaluates the fine-tuned adapters; tags ``version`` and makes it the challenger.

    ``baseline_version``, the registered no-RL baseline, gets its scores and the
    ``baseline`` alias, and the challenger is linked to it for stage 6's gate. Returns the
    % of tasks improved over the baseline (-1 without a baseline).
    """
    import shutil
    from pathlib import Path

    from refine_af import step, tracking
    from refine_af.stages import evaluate as stage
    from refine_af.stages import register

    run_config = step.config(config, config_hash)
    workspace = step.workspace()
    outcome = stage.run(
        run_config,
        Path(results.path),
        candidate=str(Path(candidate.path) / "adapter"),
        baseline=str(Path(baseline.path) / "adapter") if baseline is not None else None,
        workspace=workspace,
        parent_run_id=parent_run_id or None,
    )
    shutil.copyfile(Path(results.path) / "report.md", report.path)
    figures = {f"{name}_rougeL": result.rougeL for name, result in outcome.results.items()}
    step.record_metrics(metrics, figures)
    if parent_run_id:
        tracking.log_to_run(workspace, parent_run_id, figures)
    if version:
        register.mark_evaluated(
            tracking.connect(workspace),
            run_config.stage6.model_name,
            version,
            outcome.results[stage.CANDIDATE],
            baseline_version or None,
            outcome.results.get(stage.BASELINE),
        )
    results.metadata["config_hash"] = config_hash
    if outcome.comparison is None:
        return -1.0
    step.record_metrics(
        metrics,
        {
            "pct_tasks_improved": outcome.comparison.pct_improved,
            "mean_delta": outcome.comparison.mean_delta,
        },
    )
    figures = ("pct_improved", "ties", "candidate_rougeL", "baseline_rougeL", "mean_delta")
    results.metadata.update({k: getattr(outcome.comparison, k) for k in figures})
    return outcome.comparison.pct_improved
