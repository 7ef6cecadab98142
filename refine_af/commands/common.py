"""What every subcommand shares: the consoles, the options, loading the configuration,
holding an output folder's lock, and the progress bar."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from refine_af.config import RunConfig, load_config, load_resolved, preset_names
from refine_af.errors import InputError

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
ConfigHashOption = Annotated[
    str | None,
    typer.Option(
        help="--config is a resolved configuration (YAML text or file) with this hash, as "
        "a pipeline's plan step made it; a mismatch stops (exit 2)"
    ),
]
ParentRunOption = Annotated[
    str | None, typer.Option(help="nest the stage's MLflow run under this run")
]


def load(source: str, overrides: list[str] | None, config_hash: str | None = None) -> RunConfig:
    """The configuration: a preset or file plus overrides, or a resolved one and its hash."""
    if config_hash is None:
        return load_config(source, overrides or [])
    if overrides:
        raise InputError("--set cannot change a resolved configuration (--config-hash)")
    path = Path(source)
    text = source if "\n" in source or not path.is_file() else path.read_text(encoding="utf-8")
    return load_resolved(text, config_hash)


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
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


class _Progress(Progress):
    """Shown from its first update: an input error, which a stage finds before it reports
    any progress, is printed alone."""

    def __enter__(self) -> _Progress:
        return self

    def update(self, *args, **kwargs) -> None:
        self.start()
        super().update(*args, **kwargs)


def progress(label: str, fields: str = "", *, disable: bool = False) -> Progress:
    """A bar on stderr: ``label``, done/total, ``fields`` (a template of task fields)."""
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn()]
    if fields:
        columns.append(TextColumn(fields))
    return _Progress(*columns, TimeElapsedColumn(), console=err, disable=disable)
