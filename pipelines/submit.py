"""``refine-af submit``: compile the pipeline for the cluster it goes to, create the run
through the KFP API, and with a timeout wait for it; a run that does not succeed is told
in one line (its URL and the step that failed or was still pending).

Beside the pipeline because it needs KFP; the ``refine-af`` CLI imports it only when the
command runs. The pipeline is compiled by ``python -m pipelines.compile`` in a child
process: the image registry and tag are read when the components are imported.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kfp

from refine_af.config import RunConfig
from refine_af.errors import InputError


class SubmitFailed(RuntimeError):
    """The cluster refused the run, or the run failed or did not finish in time (exit 1)."""


def compile_for_cluster(out: Path, profile: str, options: dict[str, str | bool | None]) -> Path:
    """Compile the pipeline with ``profile`` and ``--registry``/``--tag``/``--gpu-*`` options
    (True: a flag such as ``--served-generation``) into ``out``. Needs the repository's
    ``pipelines/`` in the working directory."""
    if not Path("pipelines", "compile.py").is_file():
        raise InputError(
            f"pipelines/compile.py not found in {Path.cwd()}: run `refine-af submit` from the "
            "repository root, or pass --package with a compiled pipeline"
        )
    command = [sys.executable, "-m", "pipelines.compile", "--out", str(out), "--profile", profile]
    for name, value in options.items():
        if value is True:
            command.append(f"--{name}")
        elif value:
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


def check_options(shards: int, gpus: int, profile: str, package: Path | None) -> None:
    """The options a run needs, checked before anything is compiled or sent (exit 2)."""
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


def submit(
    host: str,
    experiment: str,
    run_config: RunConfig,
    arguments: dict[str, Any],
    *,
    profile: str,
    compile_options: dict[str, str | bool | None],
    package: Path | None,
    service_account: str | None,
    timeout: int | None,
    api_timeout: float,
    say: Callable[[str], None],
    note: Callable[[str], None],
) -> None:
    """Compile (unless ``package``), create the run with ``run_config`` as its YAML text and
    ``arguments``; with ``timeout``, wait and raise SubmitFailed unless it succeeds.
    ``say`` hears the run's id, URL and end; ``note`` the progress on the way."""
    check_options(arguments["shards"], arguments["gpus"], profile, package)
    with tempfile.TemporaryDirectory(prefix="refine-af-submit-") as scratch:
        if package is None:
            out = Path(scratch) / "refine_af.yaml"
            package = compile_for_cluster(out, profile, compile_options)
            note(f"compiled the pipeline for profile {profile}")
        arguments = {"config": run_config.to_yaml(), "overrides": [], **arguments}
        _create_and_wait(
            host, experiment, run_config, package, arguments, service_account, timeout,
            api_timeout, say,
        )  # fmt: skip


def _create_and_wait(
    host, experiment, run_config, package, arguments, service_account, timeout, api_timeout, say
) -> None:
    try:
        with _deadline(api_timeout, f"KFP API at {host} did not accept the run"):
            client = kfp.Client(host=host)
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=arguments,
                experiment_name=experiment,
                run_name=f"{run_config.name}-{run_config.config_hash()}",
                service_account=service_account,
            )
    except Exception as error:  # connection refused, HTTP errors from the API server
        raise SubmitFailed(f"could not submit to {host}: {one_line(error)}") from error
    url = run_url(host, result.run_id)
    say(f"run {result.run_id} submitted to {host} (experiment {experiment}): {url}")
    if timeout is None:
        return
    try:
        with _deadline(timeout + api_timeout, f"run {result.run_id} did not finish"):
            finished = client.wait_for_run_completion(result.run_id, timeout=timeout)
    except TimeoutError:
        try:
            steps = unfinished_steps(client.get_run(result.run_id)) or "unknown"
        except Exception:  # the cluster went away as well: the URL is what matters
            steps = "unknown"
        raise SubmitFailed(
            f"run not finished after {timeout} s: {url}; not done: {steps}"
        ) from None
    except Exception as error:  # the API server stopped answering while we waited
        raise SubmitFailed(
            f"lost {host} while waiting for the run: {url}; {one_line(error)}"
        ) from error
    say(f"run {result.run_id}: {finished.state}")
    if finished.state != "SUCCEEDED":
        steps = unfinished_steps(finished) or "unknown"
        raise SubmitFailed(f"run {finished.state}: {url}; failed step: {steps}")


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
