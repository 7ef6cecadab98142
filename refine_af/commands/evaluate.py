"""``refine-af stage evaluate``: stage 5, and the registry post-step when the model is a
registered version."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from refine_af.commands import summary
from refine_af.commands.common import (
    ConfigOption,
    SetOption,
    WorkspaceOption,
    load,
    locked,
    out,
    progress,
)
from refine_af.errors import InputError


def evaluate(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="model to evaluate: builtin alias, folder (a LoRA adapter too), hub id, "
            "s3:// prefix, or an earlier evaluation.json (default: model.base)",
        ),
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(help="compare with this model or evaluation.json")
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(
            help="the model is this version of stage6.model_name in the registry: tag it "
            "with the scores and point the challenger alias at it"
        ),
    ] = None,
    baseline_version: Annotated[
        str | None,
        typer.Option(
            help="the --baseline is this version of stage6.model_name (the run's no-RL "
            "baseline): tag it with its scores, alias it baseline, and gate --version on it"
        ),
    ] = None,
    tasks: Annotated[
        int | None, typer.Option(min=1, help="evaluate N tasks (seeded sample; stage5.tasks)")
    ] = None,
    per_task: Annotated[
        int | None, typer.Option(min=1, help="first M instances per task (stage5.per_task)")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="SuperNI-format JSONL (default: the bundled test set)")
    ] = None,
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Stage 5: zero-shot SuperNI ROUGE-L of a model, compared with a baseline.

    Writes candidate/ and baseline/ (evaluation.json, predictions.jsonl), report.md and,
    with --baseline, comparison.json and deltas.png (% of tasks improved, ties, mean delta
    with a paired bootstrap 95% interval). Everything is logged to MLflow.
    """
    from refine_af import tracking
    from refine_af.stages import evaluate as stage
    from refine_af.stages import register

    chosen = {"tasks": tasks, "per_task": per_task, "data": data}
    extra = [f"stage5.{key}={value}" for key, value in chosen.items() if value is not None]
    run_config = load(config, [*(overrides or []), *extra])
    name = run_config.stage6.model_name
    if baseline_version is not None and (baseline is None or version is None):
        raise InputError("--baseline-version needs --baseline (its model) and --version")
    registry = tracking.connect(workspace) if version is not None else None
    for number in filter(None, (version, baseline_version)):  # before any model loads
        register.require_version(registry, name, number)
    with locked(out_dir), progress("{task.description}") as bar:
        bars: dict[str, int] = {}

        def start(subject: str, total: int) -> None:
            bars[subject] = bar.add_task(subject, total=total)

        def advance(subject: str, done: int, total: int) -> None:
            bar.update(bars[subject], completed=done)

        outcome = stage.run(
            run_config,
            out_dir,
            candidate=model or run_config.model.base,
            baseline=baseline,
            workspace=workspace,
            on_start=start,
            on_progress=advance,
        )
    out.print(summary.table(f"stage 5 · evaluate · {outcome.seconds} s", _scores(outcome)))
    if registry is not None:
        candidate, base = (outcome.results.get(k) for k in (stage.CANDIDATE, stage.BASELINE))
        register.mark_evaluated(registry, name, version, candidate, baseline_version, base)
        if baseline_version is not None:
            out.print(f"{name} version {baseline_version} → alias [bold]{register.BASELINE}[/]")
        out.print(f"{name} version {version} → alias [bold]{register.CHALLENGER}[/]")


def _scores(outcome) -> list[tuple[str, object]]:
    labelled: list[tuple[str, object]] = []
    for name, result in outcome.results.items():
        labelled += [
            (name, result.model),
            (f"  ROUGE-L, mean over {len(result.tasks)} tasks", f"{result.rougeL:.2f}"),
            (f"  ROUGE-L, mean over {result.instances} instances",
             f"{result.rougeL_instances:.2f}"),
            ("  outputs cut by max_new_tokens", result.truncated),
        ]  # fmt: skip
    if (c := outcome.comparison) is not None:
        labelled += [
            ("tasks improved", f"{c.improved} ({c.pct_improved:.1f}%)"),
            ("tasks tied", f"{c.ties} ({c.pct_ties:.1f}%)"),
            ("tasks worse", f"{c.worse} ({c.pct_worse:.1f}%)"),
            ("mean delta [95% CI]", f"{c.mean_delta:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}]"),
        ]
    return [*labelled, ("report", outcome.out_dir / "report.md"), ("MLflow run", outcome.run_id)]
