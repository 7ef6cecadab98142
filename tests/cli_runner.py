"""Run the ``refine-af`` entry point in this process, as the console script does."""

import sys

import pytest

from refine_af import cli


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """The exit code; what the command printed stays in capsys."""
    monkeypatch.setattr(sys, "argv", ["refine-af", *args])
    try:
        cli.main()
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


def cli_output(monkeypatch: pytest.MonkeyPatch, capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr with its line wrapping undone)."""
    code = run_cli(monkeypatch, *args)
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())
