"""The ``refine-af`` command line: run a stage, inspect the configuration, promote, serve,
submit.

Bad input (a missing file, a malformed record, an unknown config key or model) ends with
exit code 2 and one message naming what to fix, before any output is written; a failed
environment (a server that does not answer, a full disk) with exit code 1 and one line.
``--debug`` shows the traceback as well. Every stage holds its output folder's lock. The
commands live in ``refine_af.commands``; this module assembles them and maps errors.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Annotated

import typer
from rich.text import Text

from refine_af import __version__
from refine_af.commands import registry, stages, submit
from refine_af.commands.common import ConfigOption, SetOption, err, load, out
from refine_af.config import preset_names
from refine_af.errors import (
    EndpointUnavailable,
    InputError,
    StorageUnavailable,
    TrackingUnavailable,
)

app = typer.Typer(
    help="REFINE-AF: bootstrap instructions with a small open LLM, improve the instance "
    "writer with RL from automated feedback, fine-tune, evaluate, promote.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
config_app = typer.Typer(help="Inspect run configurations.", no_args_is_help=True)
app.add_typer(stages.app, name="stage")
app.add_typer(config_app, name="config")
app.command("promote")(registry.promote)
app.add_typer(registry.models_app, name="models")
app.command("submit")(submit.submit)

_debug = False


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
    run_config = load(config, overrides)
    out.print(run_config.to_yaml(), end="", markup=False, highlight=False)
    out.print(f"# config hash: {run_config.config_hash()}", markup=False, highlight=False)


@config_app.command("presets")
def config_presets() -> None:
    """List the bundled presets."""
    for name in preset_names():
        out.print(name)


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
