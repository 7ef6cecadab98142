"""Checks of the cluster scripts in scripts/: shellcheck, strict mode, bash 3.2
(macOS) compatibility, that they refuse to start, changing nothing, when a
prerequisite is missing, and what they do with stub tools that record their calls.

No cluster, Docker or kind is needed: the scripts run against a temporary copy
of the repository with a PATH holding only bash and, where a test needs them,
fake tools that record how they were called.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import tempfile
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
        "base-image.sh",
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
        [shellcheck, "--shell=bash", *(str(p.relative_to(REPO)) for p in SHELL_FILES)],
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
    """What a script reads is in the repository; what it writes (git-ignored) may not be yet."""
    for rel in re.findall(r"\$REPO_ROOT/([\w./-]+)", script.read_text()):
        ignored = subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO).returncode == 0
        if not ignored:
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


def _run(
    script: Path, bin_dir: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "bash"), str(script)],
        cwd=cwd,
        env={"PATH": str(bin_dir), "HOME": str(cwd), **(env or {})},
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


@pytest.mark.parametrize(
    ("script", "missing"), [("build-images.sh", "docker"), ("base-image.sh", "docker mmdebstrap")]
)
def test_image_scripts_exit_2_naming_the_install_command(tmp_path: Path, script, missing) -> None:
    root, bin_dir = _sandbox(tmp_path)
    proc = _run(root / "scripts" / script, bin_dir, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"missing prerequisite(s): {missing}" in proc.stderr
    assert "apt-get install" in proc.stderr


def test_build_images_exits_2_when_the_daemon_is_down(tmp_path: Path) -> None:
    root, bin_dir = _sandbox(tmp_path)
    calls = tmp_path / "calls.log"
    _fake_tool(bin_dir, "docker", calls, exit_code=1)
    before = _snapshot(root)
    proc = _run(root / "scripts" / "build-images.sh", bin_dir, cwd=tmp_path)
    assert proc.returncode == 2
    assert "daemon does not answer" in proc.stderr and "fix: start it" in proc.stderr
    assert calls.read_text().splitlines() == ["docker info"]  # no build, no tag
    assert _snapshot(root) == before


# ---------------------------------------------------------------- bash 3.2

# Features newer than bash 3.2, the /bin/bash of macOS (no bash 3.2 package exists for
# Debian, so the scripts are checked statically: this list, plus the array rule below).
BASH4_ONLY = {
    "associative arrays": r"\b(declare|local|typeset)\s+-[a-zA-Z]*A",
    "namerefs": r"\b(declare|local|typeset)\s+-[a-zA-Z]*n\b",
    "mapfile/readarray": r"\b(mapfile|readarray)\b",
    "case conversion": r"\$\{\w+(\^\^?|,,?)\}",
    "negative subscripts": r"\$\{\w+\[-\d+\]\}",
    "coproc": r"\bcoproc\b",
    "|& and &>>": r"\|&|&>>",
    "case fall-through": r";;&|;&",
    "globstar": r"shopt\s+-s\s+globstar",
    "wait -n": r"\bwait\s+-n\b",
    "EPOCHSECONDS/EPOCHREALTIME": r"\bEPOCH(SECONDS|REALTIME)\b",
    "${var@Q} transformations": r"\$\{\w+@[A-Za-z]\}",
}


def _code_lines(path: Path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield number, line


@pytest.mark.parametrize("script", SHELL_FILES, ids=lambda p: p.name)
def test_no_bash4_features(script: Path) -> None:
    found = [
        f"{script.name}:{number}: {name}: {line.strip()}"
        for number, line in _code_lines(script)
        for name, pattern in BASH4_ONLY.items()
        if re.search(pattern, line)
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("script", SHELL_FILES, ids=lambda p: p.name)
def test_arrays_that_may_be_empty_are_never_expanded_bare(script: Path) -> None:
    """bash < 4.4 aborts on "${a[@]}" of an empty array under `set -u`. An array is
    known non-empty only when every assignment gives it a literal first element; any
    other (`a=()`, `a=("$@")`, `read -a a`) must be expanded as ${a[@]+"${a[@]}"}."""
    text = script.read_text()
    arrays = set(re.findall(r'"\$\{(\w+)\[@\]\}"', text))
    problems = []
    for name in arrays:
        assignments = re.findall(rf"\b{name}=\(([^)]*)\)", text)
        may_be_empty = re.search(rf"read\s+(-\w+\s+)*-a\s+{name}\b", text) or any(
            not first.strip() or first.strip().startswith('"$@"') for first in assignments
        )
        if not assignments and not may_be_empty:
            continue  # a function's "$@"-style parameter array is not an array here
        if may_be_empty:
            bare = re.findall(rf'(?<!\+)"\$\{{{name}\[@\]\}}"', text)
            guarded = re.findall(rf'\$\{{{name}\[@\]\+"\$\{{{name}\[@\]\}}"\}}', text)
            if len(bare) > len(guarded):
                problems.append(name)
    assert not problems, f"{script.name}: bare expansion of possibly empty arrays {problems}"


def test_the_array_rule_catches_the_old_build_script(tmp_path: Path) -> None:
    """The check above fails on the build script as it was (empty extra_args)."""
    old = tmp_path / "build-images.sh"
    old.write_text(
        'read -r -a extra_args <<<"${DOCKER_BUILD_ARGS:-}"\n'
        'docker build "${extra_args[@]}" -f x .\n'
    )
    with pytest.raises(AssertionError, match="extra_args"):
        test_arrays_that_may_be_empty_are_never_expanded_bare(old)


# ---------------------------------------------------------------- runs with stub tools


def _stubbed(tmp_path: Path, *tools: str) -> tuple[Path, Path, Path]:
    root, bin_dir = _sandbox(tmp_path)
    calls = tmp_path / "calls.log"
    for tool in tools:
        _fake_tool(bin_dir, tool, calls)
    for tool in ("od", "tr", "cat", "printf", "env"):  # coreutils the scripts may call
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return root, bin_dir, calls


def _compiled_cpu_images(registry: str, tag: str) -> set[str]:
    from pipelines import placement
    from pipelines.compile import compile_pipeline, images

    where = placement.Placement(profile="cpu", registry=registry, tag=tag)
    with tempfile.TemporaryDirectory() as scratch:
        return set(images(compile_pipeline(Path(scratch) / "p.yaml", where)))


def test_kind_load_loads_exactly_what_the_cpu_pipeline_names(tmp_path: Path) -> None:
    """Item 5: the default images kind-load.sh loads are the ones `submit --profile cpu`
    compiles into the pipeline, plus MLflow's (also under the name k8s/ gives it)."""
    root, bin_dir, calls = _stubbed(tmp_path, "docker", "kind")
    registry, tag = "kind.local/me", "dev"
    env = {"REFINE_AF_IMAGE_REGISTRY": registry, "REFINE_AF_IMAGE_TAG": tag}
    proc = _run(root / "scripts" / "kind-load.sh", bin_dir, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    loaded = {
        line.split()[-1]
        for line in calls.read_text().splitlines()
        if line.startswith("kind load docker-image")
    }
    pipeline_images = _compiled_cpu_images(registry, tag)
    manifest_mlflow = re.search(
        r"image: (\S+/mlflow:\S+)", (REPO / "k8s/base/mlflow/deployment.yaml").read_text()
    )[1]
    mlflow = {f"{registry}/mlflow:{tag}", manifest_mlflow}
    assert loaded - mlflow == pipeline_images
    assert mlflow <= loaded
    assert f"docker tag {registry}/mlflow:{tag} {manifest_mlflow}" in calls.read_text()


def test_build_images_without_extra_args_passes_none(tmp_path: Path) -> None:
    """Each image builds from its own wheelhouse context on the given base; no stray
    arguments when DOCKER_BUILD_ARGS is unset (bash 3.2 and empty arrays)."""
    root, bin_dir, calls = _stubbed(tmp_path, "docker", "python3")
    shutil.copytree(REPO / "images", root / "images")
    for tool in ("mkdir", "cp", "rm", "touch", "sha256sum", "cut", "sed", "awk", "timeout"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"BASE_IMAGE": "local/base:1"}
    proc = _run(root / "scripts" / "build-images.sh", bin_dir, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    builds = [line for line in calls.read_text().splitlines() if line.startswith("docker build")]
    assert builds == [
        f"docker build --build-arg BASE_IMAGE=local/base:1 -f {root}/images/{name}/Dockerfile "
        f"-t ghcr.io/refine-af/{name}:0.1.0 {root}/.wheelhouse/{name}"
        for name in ("runtime-cpu", "mlflow", "s3-standin")
    ]
    assert (root / ".wheelhouse" / "runtime-cpu" / "deps" / "cpu.txt").is_file()
    proc = _run(root / "scripts" / "build-images.sh", bin_dir, cwd=tmp_path,
                env={**env, "DOCKER_BUILD_ARGS": "--no-cache"})  # fmt: skip
    assert "docker build --no-cache --build-arg BASE_IMAGE=local/base:1 -f" in calls.read_text()


def test_kind_up_applies_the_overlay_and_waits_for_in_cluster_credentials(tmp_path: Path) -> None:
    """Item 14 on the scripted path: no credential file is written; the Secrets come from
    the Job, which kind-up waits for before the services."""
    root, bin_dir, calls = _stubbed(tmp_path, "docker", "kind", "kubectl", "git")
    proc = _run(root / "scripts" / "kind-up.sh", bin_dir, cwd=tmp_path,
                env={"SKIP_BUILD": "1", "SKIP_KFP": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    log = calls.read_text().splitlines()
    apply = f"kubectl --context kind-refine-af apply -k {root}/k8s/overlays/kind"
    wait = (
        "kubectl --context kind-refine-af -n refine-af wait --for=condition=complete "
        "job/refine-af-secrets --timeout=600s"
    )
    # Jobs are deleted first: applying a changed Job template (an upgrade) would fail.
    delete = (
        "kubectl --context kind-refine-af -n refine-af delete job minio-buckets "
        "refine-af-secrets --ignore-not-found"
    )
    assert apply in log and wait in log and delete in log
    assert log.index(delete) < log.index(apply) < log.index(wait)
    assert not list(root.rglob("*.env"))
    assert "kind load docker-image --name refine-af ghcr.io/refine-af/runtime-cpu:0.1.0" in log
