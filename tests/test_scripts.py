"""Checks of the cluster scripts in scripts/: shellcheck, strict mode, and that
they refuse to start, changing nothing, when a prerequisite is missing.

No cluster, Docker or kind is needed: the scripts run against a temporary copy
of the repository with a PATH holding only bash and, where a test needs them,
fake tools that record how they were called.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
SHELL_FILES = sorted(SCRIPTS.glob("*.sh"))
ENTRY_POINTS = [p for p in SHELL_FILES if p.name != "lib.sh"]
BASH = shutil.which("bash")


def test_expected_scripts_exist() -> None:
    names = {p.name for p in ENTRY_POINTS}
    assert {
        "kind-up.sh",
        "kind-e2e.sh",
        "kind-down.sh",
        "kind-load.sh",
        "build-images.sh",
        "minikube-up.sh",
        "minikube-down.sh",
    } <= names


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip(
            "shellcheck is not installed (apt-get install shellcheck); scripts were not linted"
        )
    # scripts/.shellcheckrc lets it follow `source lib.sh` from any directory.
    proc = subprocess.run(
        [shellcheck, *(str(p.relative_to(REPO)) for p in SHELL_FILES)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda p: p.name)
def test_strict_mode_and_executable(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), script
    assert "\nset -euo pipefail\n" in text, script
    assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda p: p.name)
def test_paths_named_in_scripts_exist(script: Path) -> None:
    for rel in re.findall(r"\$REPO_ROOT/([\w./-]+)", script.read_text()):
        assert (REPO / rel).exists(), f"{script.name} refers to {rel}, which does not exist"


# ---------------------------------------------------------------- prerequisites


def _sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of scripts/ and k8s/ (the scripts work relative to their own
    location) and an empty bin directory holding only bash."""
    if BASH is None:
        pytest.skip("bash not found")
    root = tmp_path / "repo"
    shutil.copytree(SCRIPTS, root / "scripts")
    shutil.copytree(REPO / "k8s", root / "k8s", ignore=shutil.ignore_patterns("*.env"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to(BASH)
    return root, bin_dir


def _fake_tool(bin_dir: Path, name: str, log: Path, exit_code: int = 0) -> None:
    """A stand-in that records its arguments and exits with exit_code."""
    tool = bin_dir / name
    tool.write_text(f'#!{BASH}\nprintf "%s %s\\n" "{name}" "$*" >> "{log}"\nexit {exit_code}\n')
    tool.chmod(0o755)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _run(script: Path, bin_dir: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "bash"), str(script)],
        cwd=cwd,
        env={"PATH": str(bin_dir), "HOME": str(cwd)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_kind_up_without_docker_and_kind_changes_nothing(tmp_path: Path) -> None:
    root, bin_dir = _sandbox(tmp_path)
    calls = tmp_path / "calls.log"
    _fake_tool(bin_dir, "kubectl", calls)  # present: must not be reported missing
    before = _snapshot(root)

    proc = _run(root / "scripts" / "kind-up.sh", bin_dir, cwd=tmp_path)

    assert proc.returncode != 0
    message = proc.stderr
    assert "missing prerequisite(s): docker kind git" in message
    assert "https://docs.docker.com/engine/install/" in message
    assert "https://kind.sigs.k8s.io/" in message
    assert "kubectl:" not in message
    assert "Nothing was changed" in message
    assert _snapshot(root) == before, "kind-up.sh created or changed files"
    assert not calls.exists(), (
        f"kind-up.sh ran tools before checking prerequisites: {calls.read_text()}"
    )


def test_kind_up_from_the_scripts_directory(tmp_path: Path) -> None:
    root, bin_dir = _sandbox(tmp_path)
    proc = _run(Path("kind-up.sh"), bin_dir, cwd=root / "scripts")
    assert proc.returncode != 0
    assert "missing prerequisite(s): docker kind kubectl git" in proc.stderr


def test_kind_up_stops_when_the_docker_daemon_is_down(tmp_path: Path) -> None:
    root, bin_dir = _sandbox(tmp_path)
    calls = tmp_path / "calls.log"
    _fake_tool(bin_dir, "docker", calls, exit_code=1)
    for tool in ("kind", "kubectl", "git"):
        _fake_tool(bin_dir, tool, calls)
    before = _snapshot(root)

    proc = _run(root / "scripts" / "kind-up.sh", bin_dir, cwd=tmp_path)

    assert proc.returncode != 0
    assert "daemon does not answer" in proc.stderr
    assert calls.read_text().splitlines() == ["docker info"]
    assert _snapshot(root) == before


@pytest.mark.parametrize(
    ("script", "missing"),
    [
        ("kind-down.sh", "kind"),
        ("kind-load.sh", "docker kind"),
        ("build-images.sh", "docker"),
        ("minikube-up.sh", "minikube docker kubectl git"),
        ("minikube-down.sh", "minikube"),
    ],
)
def test_other_scripts_report_missing_tools(tmp_path: Path, script: str, missing: str) -> None:
    root, bin_dir = _sandbox(tmp_path)
    before = _snapshot(root)
    proc = _run(root / "scripts" / script, bin_dir, cwd=tmp_path)
    assert proc.returncode != 0
    assert f"missing prerequisite(s): {missing}" in proc.stderr
    assert _snapshot(root) == before


# ---------------------------------------------------------------- credentials


def test_env_files_are_created_with_random_secrets(tmp_path: Path) -> None:
    root, _bin = _sandbox(tmp_path)
    secrets = root / "k8s" / "base" / "secrets"
    script = f'set -euo pipefail; source "{root}/scripts/lib.sh"; ensure_env_files'
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    subprocess.run([BASH, "-c", script], check=True, env=env, capture_output=True, timeout=30)

    created = sorted(p.name for p in secrets.glob("*.env"))
    assert created == ["minio-root.env", "postgres.env", "s3.env"]
    values = []
    for path in secrets.glob("*.env"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        example = dict(
            line.split("=", 1)
            for line in (path.with_name(path.name + ".example")).read_text().splitlines()
            if line and not line.startswith("#")
        )
        actual = dict(
            line.split("=", 1)
            for line in path.read_text().splitlines()
            if line and not line.startswith("#")
        )
        assert actual.keys() == example.keys()
        for key, value in actual.items():
            if example[key].startswith("change-me"):
                assert re.fullmatch(r"[0-9a-f]{48}", value), (path, key)
                values.append(value)
            else:
                assert value == example[key]
    assert len(set(values)) == len(values) == 3

    # never overwritten
    first = _snapshot(secrets)
    subprocess.run([BASH, "-c", script], check=True, env=env, capture_output=True, timeout=30)
    assert _snapshot(secrets) == first
