"""Stage 6 as a KFP component: move ``champion`` to the challenger when the gate passes."""

from kfp import dsl

from components.images import RUNTIME_CPU


@dsl.component(base_image=RUNTIME_CPU, install_kfp_package=False)
def promote(
    config: str,
    config_hash: str,
    parent_run_id: str,
    version: str,
    instructions_kept: int,
    rl_mean_reward: float,
    pct_tasks_improved: float,
    summary: dsl.Output[dsl.Markdown],
    base_mean_reward: float = None,  # noqa: RUF013 - KFP reads the plain type
) -> str:
    """Applies the stage6 gate to ``version``; a failed gate is a decision, not a failure.

    The gate compares ``version`` with its run's registered baseline and with the
    champion (register.promote). Returns the decision and records the run's headline
    figures, both comparisons and the decision on the parent MLflow run;
    ``pct_tasks_improved`` is -1 and ``base_mean_reward`` absent without a baseline.
    """
    import math
    from pathlib import Path

    from refine_af import step, tracking
    from refine_af.stages import register

    run_config = step.config(config, config_hash)
    workspace = step.workspace()
    client = tracking.connect(workspace)
    name = run_config.stage6.model_name
    result = register.promote(client, name, version, run_config.stage6, run_config.stage5)
    aliases = sorted(
        alias for alias, v in client.get_registered_model(name).aliases.items() if str(v) == version
    )
    figures = {
        "instructions_kept": instructions_kept,
        "mean_reward_base_policy": base_mean_reward,
        "mean_reward_rl_policy": rl_mean_reward,
        "pct_tasks_improved": pct_tasks_improved if pct_tasks_improved >= 0 else None,
        **{
            f"pct_tasks_improved_over_{opponent}": compared.pct_improved
            for opponent, compared in result.comparisons.items()
        },
        "promoted": float(result.decision in {"promoted", "unchanged"}),
    }
    figures = {k: v for k, v in figures.items() if v is not None and not math.isnan(v)}
    if parent_run_id:
        decision = {"refine_af.promotion": result.summary}
        tracking.log_to_run(workspace, parent_run_id, figures, decision)
    lines = [
        "# refine-af run",
        "",
        *(f"- {key.replace('_', ' ')}: {value:g}" for key, value in figures.items()),
        f"- registered: `{name}` version {version}, aliases: {', '.join(aliases) or 'none'}",
        f"- promotion: {result.summary}",
    ]
    Path(summary.path).write_text("\n".join(lines) + "\n")
    summary.metadata["config_hash"] = config_hash
    return result.decision
