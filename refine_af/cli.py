"""The ``refine-af`` command line: run a stage, inspect the configuration.

Bad input (a missing file, a malformed record, an unknown config key or model) ends with
exit code 2 and one message naming what to fix, before any output is written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from refine_af import __version__
from refine_af.config import RunConfig, load_config, preset_names
from refine_af.errors import InputError, TrackingUnavailable

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


def _config(source: str, overrides: list[str] | None) -> RunConfig:
    return load_config(source, overrides or [])


def _version(value: bool) -> None:
    if value:
        out.print(f"refine-af {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print version")
    ] = False,
) -> None:
    """REFINE-AF command line."""


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
        Path | None, typer.Option(help="seed task JSONL (default: the bundled 175)")
    ] = None,
    workspace: WorkspaceOption = Path("workspace"),
) -> None:
    """Stage 1: bootstrap new instructions from the seed tasks (Self-Instruct).

    Writes instructions.jsonl (seeds + accepted machine instructions), filtered.jsonl
    (rejected candidates with their reason), quarantine.jsonl (unparseable or truncated
    output) and summary.json. Re-running with the same --out continues the run.
    """
    from refine_af.generation import make_backend
    from refine_af.stages import instructions

    extra = [f"stage1.seed_tasks={seed_tasks}"] if seed_tasks else []
    run_config = _config(config, [*(overrides or []), *extra])
    instructions.load_seeds(run_config.stage1)  # bad seed input stops before the model loads
    err.print(f"loading model [bold]{run_config.model.base}[/] …")
    backend = make_backend(
        run_config.generation.backend,
        run_config.model.base,
        dtype=run_config.model.dtype,
        device=run_config.model.device,
        batch_size=run_config.generation.batch_size,
    )
    target = run_config.stage1.num_instructions
    with Progress(
        TextColumn("[bold]instructions"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("round {task.fields[round]} · {task.fields[rate]} kept"),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        task = progress.add_task("bootstrap", total=target, round=0, rate="-")

        def show(state: instructions.Bootstrap) -> None:
            counts = state.counts()
            rate = f"{counts['accepted'] / max(counts['candidates'], 1):.0%}"
            progress.update(task, completed=counts["accepted"], round=state.rounds, rate=rate)

        result = instructions.run(run_config, out_dir, backend, workspace=workspace, on_round=show)
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


def main() -> None:
    """Entry point: map bad input to exit code 2 with a one-line message."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except (InputError, TrackingUnavailable) as error:
        err.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
