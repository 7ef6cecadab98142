"""The library knows nothing of KFP: importing any ``refine_af`` module leaves kfp unloaded,
and the one command that needs it says what to install instead of failing to import."""

from __future__ import annotations

import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

from cli_runner import cli_output

import refine_af

REPO = Path(__file__).resolve().parents[1]


def test_no_refine_af_module_imports_kfp():
    names = ["refine_af"] + [
        info.name for info in pkgutil.walk_packages(refine_af.__path__, "refine_af.")
    ]
    assert "refine_af.cli" in names and "refine_af.stages.sft" in names
    probe = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert not any(m == 'kfp' or m.startswith('kfp.') for m in sys.modules), name\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_submit_without_kfp_exits_2_with_the_install_command(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "kfp" else find_spec(name, *a)
    )
    code, _, err = cli_output(monkeypatch, capsys, "submit", "--host", "http://localhost:1")
    assert code == 2
    assert "pip install -e '.[pipeline]'" in err and "Traceback" not in err
