"""What ``refine-af submit`` needs besides the KFP client: a pipeline compiled for the
cluster it goes to, and a one-line account of a run that did not succeed.

The pipeline is compiled by ``python -m pipelines.compile`` in a child process, from the
repository checkout the command runs in: ``refine_af`` itself never imports KFP's DSL or
the ``pipelines`` package.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from refine_af.errors import InputError


class SubmitFailed(RuntimeError):
    """The cluster refused the run, or the run failed or did not finish in time (exit 1)."""


def compile_for_cluster(out: Path, profile: str, options: dict[str, str | None]) -> Path:
    """Compile the pipeline with ``profile`` and ``--registry``/``--tag``/``--gpu-*`` options
    into ``out``. Needs the repository's ``pipelines/`` in the working directory."""
    if not Path("pipelines", "compile.py").is_file():
        raise InputError(
            f"pipelines/compile.py not found in {Path.cwd()}: run `refine-af submit` from the "
            "repository root, or pass --package with a compiled pipeline"
        )
    command = [sys.executable, "-m", "pipelines.compile", "--out", str(out), "--profile", profile]
    for name, value in options.items():
        if value:
            command += [f"--{name}", value]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise InputError(f"compiling the pipeline ({' '.join(command[1:])}) failed: {last}")
    return out


def run_url(host: str, run_id: str) -> str:
    """The run's page in the KFP UI (the UI also serves the API on the documented hosts)."""
    return f"{host.rstrip('/')}/#/runs/details/{run_id}"


def one_line(error: BaseException) -> str:
    """An error as one line. KFP's ApiException prints status, reason, every response
    header and the body on separate lines; keep status, reason and body."""
    status, reason = getattr(error, "status", None), getattr(error, "reason", None)
    text = str(error)
    if status is not None and reason is not None:
        body = getattr(error, "body", None)
        if isinstance(body, bytes):
            body = body.decode(errors="replace")
        text = f"HTTP {status} {reason}" + (f": {body}" if body else "")
    return " ".join(text.split())


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def unfinished_steps(run: Any) -> str:
    """``name (STATE: error)`` for every step that failed, else for every step that has not
    succeeded yet (pending, running); "" when the run has no step details."""
    tasks = _field(_field(run, "run_details"), "task_details") or []
    rows = []
    for task in tasks:
        name = _field(task, "display_name") or _field(task, "task_id") or "?"
        state = str(_field(task, "state") or "UNKNOWN")
        error = _field(task, "error")
        message = _field(error, "message") if error else None
        rows.append((name, state, message))
    steps = [r for r in rows if r[0] != "root"]  # the DAG itself fails with any step
    failed = [r for r in steps if r[1] == "FAILED"]
    chosen = failed or [r for r in steps if r[1] not in {"SUCCEEDED", "SKIPPED", "CACHED"}]
    return ", ".join(f"{n} ({s}{': ' + m if m else ''})" for n, s, m in chosen)
