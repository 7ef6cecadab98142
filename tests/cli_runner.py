"""Run the ``refine-af`` entry point in this process, as the console script does."""

import sys

import pytest

from refine_af import cli


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr with its line wrapping undone)."""
    monkeypatch.setattr(sys, "argv", ["refine-af", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())
