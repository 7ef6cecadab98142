"""The ``refine-af`` command line: run a stage, inspect the configuration.

Bad input (a missing file, a malformed record, an unknown config key or model) ends with
exit code 2 and one message naming what to fix, before any output is written; a failed
environment (a server that does not answer, a full disk) with exit code 1 and one line.
``--debug`` shows the traceback as well. Every stage holds its output folder's lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from refine_af import __version__
from refine_af.config import RunConfig, load_config, preset_names
from refine_af.errors import (
    EndpointUnavailable,
    InputError,
    StorageUnavailable,
    TrackingUnavailable,
)

if TYPE_CHECKING:
    from refine_af.stages.evaluate import EvaluateOutcome

app = typer.Typer(
    help="REFINE-AF: bootstrap instructions with a small open LLM, improve the instance "
    "writer with RL from automated feedback, fine-tune, evaluate, promote.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
stage_app = typer.Typer(
    help="Run one stage of the method on local paths.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
config_app = typer.Typer(help="Inspect run configurations.", no_args_is_help=True)
app.add_typer(stage_app, name="stage")
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True)

ConfigOption = Annotated[
    str,
    typer.Option(
        "--config", "-c", help=f"preset name ({', '.join(preset_names())}) or a YAML file"
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override one value: section.key=value (repeatable)"),
]
WorkspaceOption = Annotated[
    Path,
    typer.Option(
        help="where the local MLflow store lives when MLFLOW_TRACKING_URI is unset",
        envvar="REFINE_AF_WORKSPACE",
    ),
]


_debug = False


def _config(source: str, overrides: list[str] | None) -> RunConfig:
    return load_config(source, overrides or [])


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir``'s lock: a second run on the same folder stops with exit 2."""
    from refine_af import locking

    if str(out_dir).startswith("s3:"):
        raise InputError(
            f"--out {out_dir}: output folders are local (the pipeline uploads them); "
            "give a local path"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir}: is a file, not a folder")
    with locking.output_lock(out_dir, warn=lambda message: err.print(f"[yellow]{message}[/]")):
        yield


def _version(value: bool) -> None:
    if value:
        out.print(f"refine-af {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print version")
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", help="show the traceback of an error", envvar="REFINE_AF_DEBUG"),
    ] = False,
) -> None:
    """REFINE-AF command line."""
    global _debug
    _debug = debug


@config_app.command("show")
def config_show(config: ConfigOption = "local-cpu", overrides: SetOption = None) -> None:
    """Print the validated configuration (every default filled in) and its hash."""
    run_config = _config(config, overrides)
    out.print(run_config.to_yaml(), end="", markup=False, highlight=False)
    out.print(f"# config hash: {run_config.config_hash()}", markup=False, highlight=False)


@config_app.command("presets")
def config_presets() -> None:
    """List the bundled presets."""
    for name in preset_names():
        out.print(name)


@stage_app.command("instructions")
def stage_instructions(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output folder (resumable)")],
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    seed_tasks: Annotated[
        str | None, typer.Option(help="seed task JSONL, path or s3:// (default: the bundled 175)")
    ] = None,
    force_resume: Annotated[
        bool,
        typer.Option(help="continue a run in --out even if its pool came from other settings"),
    ] = False,
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Stage 1: bootstrap new instructions from the seed tasks (Self-Instruct).

    Writes instructions.jsonl (seeds + accepted machine instructions), filtered.jsonl
    (rejected candidates with their reason), quarantine.jsonl (unparseable or truncated
    output) and summary.json. Re-running with the same --out continues the run.
    """
    from refine_af.stages import instructions

    extra = [f"stage1.seed_tasks={seed_tasks}"] if seed_tasks else []
    run_config = _config(config, [*(overrides or []), *extra])
    target = run_config.stage1.num_instructions
    instructions.check(run_config, out_dir, workspace, force_resume=force_resume)
    with (
        _locked(out_dir),
        Progress(
            TextColumn("[bold]instructions"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("round {task.fields[round]} · {task.fields[rate]} kept"),
            TimeElapsedColumn(),
            console=err,
        ) as progress,
    ):
        task = progress.add_task("bootstrap", total=target, round=0, rate="-")

        def show(state: instructions.Bootstrap) -> None:
            counts = state.counts()
            rate = f"{counts['accepted'] / max(counts['candidates'], 1):.0%}"
            progress.update(task, completed=counts["accepted"], round=state.rounds, rate=rate)

        result = instructions.execute(
            run_config, out_dir, workspace=workspace, on_round=show, force_resume=force_resume
        )
    out.print(_summary_table(result.summary))
    if not result.summary["reached_target"]:
        err.print(
            f"[yellow]stopped after stage1.max_rounds={run_config.stage1.max_rounds} rounds "
            f"with {result.summary['accepted']}/{target} instructions[/]"
        )


def _summary_table(summary: dict) -> Table:
    table = Table(title=f"stage 1 · instructions · {summary['seconds']} s", show_lines=False)
    table.add_column("outcome")
    table.add_column("count", justify="right")
    table.add_row("candidates", str(summary["candidates"]), style="bold")
    table.add_row("accepted", str(summary["accepted"]), style="green")
    for reason, count in summary["filtered"].items():
        table.add_row(f"filtered: {reason}", str(count))
    for reason, count in summary["quarantined"].items():
        table.add_row(f"quarantined: {reason}", str(count))
    table.add_row("of accepted: classification", str(summary["classification"]))
    table.add_row("rounds", str(summary["rounds"]))
    return table


# ---------------------------------------------------------------- stage 2


@stage_app.command("rlaf")
def stage_rlaf(
    instructions: Annotated[
        str, typer.Option("--instructions", "-i", help="stage 1's instructions.jsonl (or s3://)")
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output folder (resumable)")],
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Stage 2: train the instance writer by RL from automated feedback (LoRA, trl).

    Writes adapter/ (LoRA weights + tokenizer), rlaf_config.yaml, reward.json,
    metrics.jsonl, reward_curves.png, samples.jsonl and summary.json; trainer checkpoints
    in checkpoints/ let a re-run with the same --out continue. On GPUs, launch it with
    `accelerate launch --num_processes N -m refine_af.cli stage rlaf` and the same options.
    """
    from accelerate import PartialState

    from refine_af.stages import rlaf

    run_config = _config(config, overrides)
    limits = run_config.limits.by_field()
    rlaf.load_instructions(instructions, run_config.stage2, limits)  # stops before models load
    err.print(f"loading scorers and policy [bold]{run_config.model.base}[/] …")
    with (
        _locked(out_dir),
        Progress(
            TextColumn("[bold]rlaf"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("reward {task.fields[reward]}"),
            TimeElapsedColumn(),
            console=err,
            disable=not PartialState().is_main_process,
        ) as progress,
    ):
        task = progress.add_task("rlaf", total=run_config.stage2.max_steps, reward="-")

        def show(step: int, total: int, metrics: dict[str, float]) -> None:
            reward = metrics.get("reward")
            shown = {} if reward is None else {"reward": f"{reward:.3f}"}
            progress.update(task, completed=step, total=total, **shown)

        result = rlaf.run(run_config, instructions, out_dir, workspace=workspace, on_step=show)
    if result.summary:
        out.print(_rlaf_table(result.summary, result.out_dir))


def _rlaf_table(summary: dict, out_dir: Path) -> Table:
    table = Table(title=f"stage 2 · rlaf ({summary['trainer']}) · {summary['seconds']} s")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("instructions", str(summary["instructions"]))
    table.add_row("steps", str(summary["steps"]), style="bold")
    for key in ("reward_first5", "reward_last5"):
        value = summary[key]
        table.add_row(key.replace("_", " "), "-" if value is None else f"{value:.4f}")
    table.add_row("completions scored", str(summary["completions_scored"]))
    for reason, count in summary["floored"].items():
        table.add_row(f"floored: {reason}", str(count))
    table.add_row("adapter", str(out_dir / summary["adapter"]), style="green")
    return table


# ---------------------------------------------------------------- stage 3 and 4


@stage_app.command("instances")
def stage_instances(
    instructions: Annotated[
        str, typer.Option("--instructions", "-i", help="stage 1's instructions.jsonl (or s3://)")
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    adapter: Annotated[
        str | None,
        typer.Option(help="stage 2's adapter folder (stage3.adapter); without it: the baseline"),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(help="write only shard i of n (0-based, e.g. 0/4); join with `stage merge`"),
    ] = None,
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Stage 3: instances for the instructions, written by the policy and scored.

    Writes examples.jsonl (the triplets with scores and reward), filtered.jsonl and
    quarantine.jsonl (with reasons), alpaca.json, dataset/ (parquet + dataset card) and
    summary.json. With --shard, writes that shard's records and shard.json instead.
    """
    from refine_af.stages import instances

    extra = [f"stage3.adapter={adapter}"] if adapter else []
    run_config = _config(config, [*(overrides or []), *extra])
    part = instances.Shard.parse(shard) if shard else None
    blocks = instances.assigned_blocks(
        instances.load_instructions(instructions, run_config), run_config, part
    )
    with (
        _locked(out_dir),
        Progress(
            TextColumn("[bold]instances"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("instructions · {task.fields[kept]} kept"),
            TimeElapsedColumn(),
            console=err,
        ) as progress,
    ):
        task = progress.add_task("instances", total=sum(map(len, blocks)), kept=0)

        def show(done: int, total: int, so_far: instances.Part) -> None:
            progress.update(task, completed=done, kept=len(so_far.examples))

        result = instances.execute(
            run_config,
            instructions,
            out_dir,
            workspace=workspace,
            shard=part,
            on_block=show,
        )
    out.print(_instances_table(result.summary, part))
    if part is None and not result.summary["kept"]:
        err.print("[yellow]no example was kept; stage 4 needs some (see filtered.jsonl)[/]")


@stage_app.command("merge")
def stage_merge(
    shards: Annotated[
        list[Path], typer.Argument(help="shard folders of one `stage instances` run")
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Stage 3: join the shards of `stage instances --shard i/n` into the dataset.

    The result is the same, byte for byte, as one unsharded run; the configuration is the
    one the shards recorded.
    """
    from refine_af.stages import instances

    with _locked(out_dir):
        result = instances.merge(shards, out_dir, workspace=workspace)
    out.print(_instances_table(result.summary, None))


def _instances_table(summary: dict, shard) -> Table:
    where = f" · shard {shard.index}/{shard.count}" if shard else ""
    title = f"stage 3 · instances ({summary['policy']} policy){where} · {summary['seconds']} s"
    table = Table(title=title)
    table.add_column("outcome")
    table.add_column("count", justify="right")
    table.add_row("instructions", str(summary["instructions"]))
    table.add_row("completions sampled", str(summary["generations"]), style="bold")
    table.add_row("kept", str(summary["kept"]), style="green")
    for reason, count in summary["filtered"].items():
        table.add_row(f"filtered: {reason}", str(count))
    for reason, count in summary["quarantined"].items():
        table.add_row(f"quarantined: {reason}", str(count))
    table.add_row("instructions with examples", str(summary["instructions_with_examples"]))
    reward = summary["mean_reward"]
    table.add_row("mean reward of kept", "-" if reward is None else f"{reward:.4f}")
    return table


@stage_app.command("sft")
def stage_sft(
    examples: Annotated[
        str, typer.Option("--examples", "-e", help="stage 3's examples.jsonl (or s3://)")
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Stage 4: fine-tune a LoRA adapter on the examples (trl SFT) and register it.

    Writes adapter/ (LoRA weights, tokenizer, model card), sft_config.yaml, metrics.jsonl
    and summary.json; the adapter becomes a new version of stage6.model_name in the MLflow
    registry unless stage4.register_model=false. On several GPUs:
    `accelerate launch --num_processes N -m refine_af.cli stage sft ...`.
    """
    from accelerate import PartialState

    from refine_af.stages import sft

    run_config = _config(config, overrides)
    sft.prepare(run_config, examples)  # bad input stops before the model loads
    err.print(f"loading [bold]{run_config.model.base}[/] …")
    with (
        _locked(out_dir),
        Progress(
            TextColumn("[bold]sft"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=err,
            disable=not PartialState().is_main_process,
        ) as progress,
    ):
        task = progress.add_task("sft", total=None, loss="-")

        def show(step: int, total: int, metrics: dict[str, float]) -> None:
            loss = metrics.get("loss")
            shown = {} if loss is None else {"loss": f"{loss:.3f}"}
            progress.update(task, completed=step, total=total, **shown)

        result = sft.run(run_config, examples, out_dir, workspace=workspace, on_step=show)
    if result.summary:
        out.print(_sft_table(result.summary))


def _sft_table(summary: dict) -> Table:
    table = Table(title=f"stage 4 · sft ({summary['policy']} policy data) · {summary['seconds']} s")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("train examples", str(summary["train_examples"]))
    table.add_row(
        "held-out examples (instructions)",
        f"{summary['eval_examples']} ({summary['eval_instructions']})",
    )
    table.add_row("template", summary["template"])
    table.add_row("steps (epochs)", f"{summary['steps']} ({summary['epochs']})", style="bold")
    for key in ("train_loss", "eval_loss_before", "eval_loss"):
        value = summary[key]
        table.add_row(key.replace("_", " "), "-" if value is None else f"{value:.4f}")
    table.add_row("adapter", str(summary["adapter"]), style="green")
    version = summary["registered_version"]
    registered = f"{summary['registered_model']} v{version}" if version else "not registered"
    table.add_row("registered", registered)
    return table


# ---------------------------------------------------------------- stage 5 and 6


@stage_app.command("evaluate")
def stage_evaluate(
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
    from refine_af.stages import evaluate, register

    extra = [f"stage5.{key}={value}" for key, value in (("tasks", tasks), ("per_task", per_task))]
    extra = [item for item in extra if not item.endswith("=None")]
    if data:
        extra.append(f"stage5.data={data}")
    run_config = _config(config, [*(overrides or []), *extra])
    registry = None
    if baseline_version is not None and (baseline is None or version is None):
        raise InputError("--baseline-version needs --baseline (its model) and --version")
    if version is not None:  # an unknown version stops before any model loads
        registry = tracking.connect(workspace)
        for number in filter(None, (version, baseline_version)):
            register.require_version(registry, run_config.stage6.model_name, number)
    with (
        _locked(out_dir),
        Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
        ) as progress,
    ):
        bars: dict[str, int] = {}

        def start(subject: str, total: int) -> None:
            bars[subject] = progress.add_task(subject, total=total)

        def advance(subject: str, done: int, total: int) -> None:
            progress.update(bars[subject], completed=done)

        outcome = evaluate.run(
            run_config,
            out_dir,
            candidate=model or run_config.model.base,
            baseline=baseline,
            workspace=workspace,
            on_start=start,
            on_progress=advance,
        )
    out.print(_evaluation_table(outcome))
    if registry is not None:
        name = run_config.stage6.model_name
        if baseline_version is not None:
            baseline_result = outcome.results[evaluate.BASELINE]
            register.mark_baseline(registry, name, baseline_version, baseline_result)
            out.print(f"{name} version {baseline_version} → alias [bold]{register.BASELINE}[/]")
        candidate_result = outcome.results[evaluate.CANDIDATE]
        register.mark_challenger(registry, name, version, candidate_result, baseline_version)
        out.print(f"{name} version {version} → alias [bold]{register.CHALLENGER}[/]")


def _evaluation_table(outcome: EvaluateOutcome) -> Table:
    table = Table(title=f"stage 5 · evaluate · {outcome.seconds} s")
    table.add_column("")
    table.add_column("value", justify="right")
    for name, result in outcome.results.items():
        table.add_row(f"{name}", result.model, style="bold")
        table.add_row(f"  ROUGE-L, mean over {len(result.tasks)} tasks", f"{result.rougeL:.2f}")
        table.add_row(
            f"  ROUGE-L, mean over {result.instances} instances", f"{result.rougeL_instances:.2f}"
        )
        table.add_row("  outputs cut by max_new_tokens", str(result.truncated))
    if (c := outcome.comparison) is not None:
        table.add_row("tasks improved", f"{c.improved} ({c.pct_improved:.1f}%)", style="green")
        table.add_row("tasks tied", f"{c.ties} ({c.pct_ties:.1f}%)")
        table.add_row("tasks worse", f"{c.worse} ({c.pct_worse:.1f}%)", style="red")
        table.add_row(
            "mean delta [95% CI]", f"{c.mean_delta:+.2f} [{c.ci_low:+.2f}, {c.ci_high:+.2f}]"
        )
    table.add_row("report", str(outcome.out_dir / "report.md"))
    table.add_row("MLflow run", outcome.run_id)
    return table


@app.command("promote")
def promote(
    version: Annotated[
        str | None, typer.Option(help="version to promote (default: the challenger alias)")
    ] = None,
    force: Annotated[bool, typer.Option(help="promote even if the gate fails")] = False,
    reason: Annotated[
        str | None, typer.Option(help="why the gate is overridden (needed with --force)")
    ] = None,
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Stage 6: move the champion alias to the challenger if it passes the gate.

    The gate (stage6) compares the challenger's SuperNI evaluation task by task with its
    run's no-RL baseline and with the champion's, and must pass against each. With neither
    (a run without baseline on a registry without champion) there is nothing to beat and
    the challenger is rejected; --force --reason is the explicit override. Exits 1 when
    rejected; the decision, comparisons and gate are recorded as version tags either way.
    """
    from refine_af import tracking
    from refine_af.stages import register

    run_config = _config(config, overrides)
    client = tracking.connect(workspace)
    result = register.promote(
        client,
        run_config.stage6.model_name,
        version,
        run_config.stage6,
        run_config.stage5,
        force=force,
        reason=reason,
    )
    table = Table(title=f"stage 6 · promote · {result.model_name}")
    table.add_column("")
    table.add_column("value")
    table.add_row("version", result.version, style="bold")
    table.add_row("champion before", result.champion_before or "none")
    style = "red" if result.rejected else "green"
    table.add_row("decision", result.decision, style=f"bold {style}")
    for line in result.reasons:
        table.add_row("", line)
    out.print(table)
    if result.rejected:
        champion = result.champion_before
        err.print(
            f"[bold red]gate failed:[/] version {result.version} stays challenger; "
            + (f"champion is still version {champion}" if champion else "there is no champion")
            + f"\n{result.summary}",
            highlight=False,
        )
        raise typer.Exit(1)


models_app = typer.Typer(help="Inspect and serve registered models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Registered versions of stage6.model_name: aliases, lineage, evaluation, promotion.

    The run's no-RL baselines are versions too (policy base, alias baseline on the latest).
    """
    from refine_af import tracking
    from refine_af.stages import register

    run_config = _config(config, overrides)
    name = run_config.stage6.model_name
    versions = register.list_versions(tracking.connect(workspace), name)
    table = Table(title=f"registered model {name}")
    columns = ("version", "aliases", "policy", "created (UTC)", "ROUGE-L", "tasks")
    for column in (*columns, "vs baseline", "vs champion", "promotion"):
        table.add_column(column, justify="right" if column in {"ROUGE-L", "tasks"} else "left")
    table.add_column("lineage", no_wrap=True)
    for v in versions:
        tags = v.tags
        rouge = tags.get(f"{register.EVAL}rougeL")
        table.add_row(
            v.version,
            ", ".join(v.aliases),
            tags.get(register.POLICY_TAG, "-"),
            v.created.strftime("%Y-%m-%d %H:%M"),
            f"{float(rouge):.2f}" if rouge else "-",
            tags.get(f"{register.EVAL}tasks", "-"),
            *(_versus(tags, opponent) for opponent in (register.BASELINE, register.CHAMPION)),
            tags.get(f"{register.PROMOTION}decision", "-"),
            _lineage(tags),
        )
    out.print(table)


def _versus(tags: dict[str, str], opponent: str) -> str:
    """'62.5% improved (v3)' from the promotion tags of one comparison."""
    prefix = f"refine_af.promotion.{opponent}."
    improved = tags.get(f"{prefix}pct_tasks_improved")
    if improved is None:
        return "-"
    return f"{float(improved):.1f}% improved (v{tags.get(f'{prefix}version', '?')})"


def _lineage(tags: dict[str, str]) -> str:
    """Where a version came from: config hash, parent run, dataset digest, base model."""
    fields = (
        ("config", "refine_af.config_hash", 12),
        ("parent run", "refine_af.parent_run_id", 12),
        ("data", "refine_af.dataset_sha256", 12),
        ("base", "refine_af.base_model", None),
    )
    shown = [f"{label} {tags[key][:width]}" for label, key, width in fields if tags.get(key)]
    return ", ".join(shown) or "-"


@models_app.command("serve")
def models_serve(
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    workspace: WorkspaceOption = Path("workspace"),
    alias: Annotated[str, typer.Option(help="registry alias to serve")] = "champion",
    version: Annotated[
        str | None, typer.Option(help="serve this version instead of the alias")
    ] = None,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 5001,
) -> None:
    """Serve a registered version over HTTP with `mlflow models serve --env-manager local`.

    The model answers POST /invocations in the format its flavor documents: OpenAI-style
    {"messages": [...]} for a chat model (optional max_tokens, temperature, top_p, top_k,
    stop; "top_k": 1 for the greedy answer, as temperature 0 is refused when the model
    samples), {"prompt": "..."} otherwise (optional max_tokens, temperature, stop). Runs
    until interrupted.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    from refine_af import serving, tracking

    run_config = _config(config, overrides)
    name = run_config.stage6.model_name
    client = tracking.connect(workspace)
    try:
        found = (
            client.get_model_version(name, version)
            if version
            else client.get_model_version_by_alias(name, alias)
        )
    except MlflowException as error:
        wanted = f"version {version}" if version else f"alias @{alias}"
        raise InputError(f"registered model {name!r} has no {wanted} ({error.message})") from None
    model_uri = f"models:/{name}/{found.version}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(workspace)  # for the server too
    task = get_model_info(model_uri).flavors.get("transformers", {}).get("inference_task")
    example = serving.request(task, "Give me three tips for staying focused.", max_tokens=64)
    served = f"@{alias}" if version is None else "by version"
    out.print(f"serving {model_uri} ({served}) on http://{host}:{port}; try:")
    out.print(
        f"curl -s http://{host}:{port}/invocations -H 'Content-Type: application/json' "
        f"-d '{json.dumps(example)}'",
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    if task in serving.REQUEST_FIELDS:  # not for a version logged before llm/v1 tasks
        out.print(f"a request may also set: {', '.join(serving.REQUEST_FIELDS[task])}")
    command = serving.serve_command(model_uri, host, port)
    # mlflow starts `uvicorn` by name: this environment's, even when it is not activated
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    os.execv(command[0], command)


@app.command("submit")
def submit(
    host: Annotated[str, typer.Option(help="KFP API endpoint, e.g. http://localhost:30880")],
    experiment: Annotated[str, typer.Option(help="KFP experiment")] = "refine-af",
    config: ConfigOption = "local-cpu",
    overrides: SetOption = None,
    shards: Annotated[int, typer.Option(help="instance-generation shards")] = 2,
    baseline: Annotated[bool, typer.Option(help="also build the no-RL baseline")] = True,
    profile: Annotated[
        str,
        typer.Option(help="placement: cpu (runtime-cpu, no GPUs: kind) or gpu (GPU nodes)"),
    ] = "gpu",
    registry: Annotated[
        str | None,
        typer.Option(help="image registry", envvar="REFINE_AF_IMAGE_REGISTRY", show_default=False),
    ] = None,
    tag: Annotated[
        str | None, typer.Option(help="image tag", envvar="REFINE_AF_IMAGE_TAG", show_default=False)
    ] = None,
    gpus: Annotated[int, typer.Option(help="GPUs per training step (gpu profile)")] = 1,
    gpu_node_label: Annotated[
        str | None, typer.Option(help="key=value label of GPU nodes [nvidia.com/gpu.present=true]")
    ] = None,
    gpu_resource: Annotated[
        str | None, typer.Option(help="extended resource of a GPU [nvidia.com/gpu]")
    ] = None,
    gpu_toleration: Annotated[
        str | None, typer.Option(help="key:Effect taint of GPU nodes [nvidia.com/gpu:NoSchedule]")
    ] = None,
    model_cache: Annotated[
        str | None,
        typer.Option(help="PVC (namespace kubeflow) that model steps share as model cache"),
    ] = None,
    package: Annotated[
        Path | None,
        typer.Option(help="upload this compiled pipeline as it is instead of compiling one"),
    ] = None,
    service_account: Annotated[str | None, typer.Option(help="pods' ServiceAccount")] = None,
    wait: Annotated[bool, typer.Option(help="wait for the run to finish")] = False,
    timeout: Annotated[int, typer.Option(help="seconds to wait with --wait")] = 7200,
    api_timeout: Annotated[
        float,
        typer.Option(min=1, help="seconds the KFP API may take to accept the run (or to report)"),
    ] = 60.0,
    generation_endpoint: Annotated[
        str,
        typer.Option(help="OpenAI-compatible server (vLLM) for stages 1, 3, 5; default in-process"),
    ] = "",
) -> None:
    """Compile the pipeline for the cluster and submit it to Kubeflow Pipelines.

    The configuration is checked here and sent as YAML text (the `config` parameter), so a
    bad preset or override stops (exit 2) before anything reaches the cluster. The pipeline
    is compiled to a temporary file with the profile, registry and tag asked for; the
    committed pipelines/refine_af.yaml is not touched. A run that fails or outlasts
    --timeout ends with exit 1, its URL and the step that failed or was still pending.
    """
    import tempfile

    from refine_af import submission

    if shards < 1:
        raise InputError(f"--shards must be at least 1, got {shards}")
    if gpus < 1:
        raise InputError(f"--gpus must be at least 1, got {gpus}")
    if profile not in {"cpu", "gpu"}:
        raise InputError(f"--profile must be cpu or gpu, got {profile!r}")
    if profile == "cpu" and gpus > 1:
        raise InputError(
            f"--gpus {gpus} needs --profile gpu: the cpu profile trains in one process"
        )
    if package is not None and not package.is_file():
        raise InputError(f"{package}: compiled pipeline not found")
    run_config = _config(config, overrides)
    with tempfile.TemporaryDirectory(prefix="refine-af-submit-") as scratch:
        if package is None:
            options = {
                "registry": registry,
                "tag": tag,
                "gpu-node-label": gpu_node_label,
                "gpu-resource": gpu_resource,
                "gpu-toleration": gpu_toleration,
                "model-cache": model_cache,
            }
            package = submission.compile_for_cluster(
                Path(scratch) / "refine_af.yaml", profile, options
            )
            err.print(f"compiled the pipeline for profile {profile}", highlight=False)
        try:
            _submit_and_wait(
                host, experiment, run_config, package, shards, baseline, gpus,
                service_account, timeout if wait else None, api_timeout, generation_endpoint,
            )  # fmt: skip
        except submission.SubmitFailed as error:
            err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


def _submit_and_wait(
    host,
    experiment,
    run_config,
    package,
    shards,
    baseline,
    gpus,
    service_account,
    timeout,
    api_timeout,
    generation_endpoint="",
) -> None:
    """Create the run; with a timeout, wait and raise SubmitFailed unless it succeeds."""
    import kfp

    from refine_af import submission

    try:
        with _deadline(api_timeout, f"KFP API at {host} did not accept the run"):
            client = kfp.Client(host=host)
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments={
                    "config": run_config.to_yaml(),
                    "overrides": [],
                    "shards": shards,
                    "run_baseline": baseline,
                    "gpus": gpus,
                    "generation_endpoint": generation_endpoint,
                },
                experiment_name=experiment,
                run_name=f"{run_config.name}-{run_config.config_hash()}",
                service_account=service_account,
            )
    except Exception as error:  # connection refused, HTTP errors from the API server
        raise submission.SubmitFailed(
            f"could not submit to {host}: {submission.one_line(error)}"
        ) from error
    url = submission.run_url(host, result.run_id)
    out.print(f"run {result.run_id} submitted to {host} (experiment {experiment}): {url}")
    if timeout is None:
        return
    try:
        with _deadline(timeout + api_timeout, f"run {result.run_id} did not finish"):
            finished = client.wait_for_run_completion(result.run_id, timeout=timeout)
    except TimeoutError:
        try:
            steps = submission.unfinished_steps(client.get_run(result.run_id)) or "unknown"
        except Exception:  # the cluster went away as well: the URL is what matters
            steps = "unknown"
        raise submission.SubmitFailed(
            f"run not finished after {timeout} s: {url}; not done: {steps}"
        ) from None
    except Exception as error:  # the API server stopped answering while we waited
        raise submission.SubmitFailed(
            f"lost {host} while waiting for the run: {url}; {submission.one_line(error)}"
        ) from error
    out.print(f"run {result.run_id}: {finished.state}")
    if finished.state != "SUCCEEDED":
        steps = submission.unfinished_steps(finished) or "unknown"
        raise submission.SubmitFailed(f"run {finished.state}: {url}; failed step: {steps}")


class _Expired(BaseException):
    """Raised by the alarm: a BaseException, so no library's retry loop catches it."""


@contextlib.contextmanager
def _deadline(seconds: float, what: str) -> Iterator[None]:
    """Bound a block that may block forever: the KFP client sends its requests without a
    timeout, so a host that accepts connections and never answers would hang it."""

    def expire(signum, frame) -> None:
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired:
        raise TimeoutError(f"{what} within {seconds:g} s (--api-timeout)") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _one_line(error: BaseException) -> tuple[int, str]:
    """Exit code and message: 2 when the input is at fault, 1 when the environment is."""
    if isinstance(error, InputError):
        return 2, str(error)
    if isinstance(error, TrackingUnavailable | StorageUnavailable | EndpointUnavailable):
        return 1, str(error)
    if isinstance(error, OSError):
        where = error.filename or ""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return 1, f"no space left on the device writing {where}; free some and re-run"
        if isinstance(error, IsADirectoryError):
            return 2, f"{where}: is a folder; expected a file"
        if isinstance(error, NotADirectoryError):
            return 2, f"{where}: a part of this path is a file, not a folder"
        if isinstance(error, FileNotFoundError):
            return 2, f"{where or error}: not found"
        if isinstance(error, PermissionError):
            return 2, f"{where}: permission denied"
        if isinstance(error, ConnectionError | TimeoutError):
            return 1, f"connection failed: {error}"
    text = str(error).strip().splitlines()
    return 1, f"{type(error).__name__}: {text[0] if text else ''} (--debug shows the traceback)"


def main() -> None:
    """Entry point: map every error to its exit code and a one-line message."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]")
        sys.exit(130)
    except Exception as error:
        if _debug:
            err.print_exception()
        code, message = _one_line(error)
        err.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
