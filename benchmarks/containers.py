"""Containers against subprocesses: image builds and the tiny pipeline, side by side.

Builds the images twice — cold (the three images and their layers removed first, the base
image and the host wheelhouse kept) and warm (every layer cached: what a rerun of ``make
images`` costs) — then runs
the tiny-settings pipeline once with ``--runner subprocess`` and once with
``--runner docker`` in the same session, and counts the S3 objects the container run
wrote. The last line printed is one JSON object. Targets: image_cpu_gb ≤ 2.5,
build_warm_s ≤ 60, ratio (docker ÷ subprocess) ≤ 1.5, s3_objects > 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.images import MLFLOW, RUNTIME_CPU, S3_STANDIN  # noqa: E402
from pipelines.tests.test_local_run import TINY  # noqa: E402

IMAGES = ("runtime-cpu", "mlflow", "s3-standin")


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, **(env or {})})
    return time.monotonic() - started


def remove_images(refs: list[str]) -> None:
    """The images and the intermediate layers only they use; the base image stays.

    Not ``docker build --no-cache``: the legacy builder then makes a second copy of every
    step the Dockerfiles share (runtime-cpu, mlflow and s3-standin start alike), and the
    next cached build follows the wrong copy and rebuilds runtime-cpu from its COPY on.
    """
    subprocess.run(["docker", "image", "rm", "--force", *refs], check=False, capture_output=True)
    subprocess.run(["docker", "image", "prune", "--force"], check=True, capture_output=True)


def image_gb(ref: str) -> float:
    out = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Size}}", ref],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return int(out.stdout) / 1e9


def pipeline(runner: str, workspace: Path) -> float:
    command = [sys.executable, "-m", "pipelines.run_local", "--runner", runner,
               "--workspace", str(workspace), "--shards", "2", "--mlflow-port", "0"]  # fmt: skip
    for override in TINY:
        command += ["--set", override]
    return timed(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-cold", action="store_true", help="keep the images: warm only")
    args = parser.parse_args()
    build = [str(REPO / "scripts" / "build-images.sh"), *IMAGES]
    cold = None
    if not args.skip_cold:
        print("== cold build (images and their layers removed first)", flush=True)
        remove_images([RUNTIME_CPU, MLFLOW, S3_STANDIN])
        cold = timed(build)
    print("== warm build (layers cached)", flush=True)
    warm = timed(build)
    with tempfile.TemporaryDirectory(prefix="bench-containers-") as tmp:
        print("== tiny pipeline, subprocess runner", flush=True)
        sub = pipeline("subprocess", Path(tmp) / "subprocess")
        print("== tiny pipeline, docker runner", flush=True)
        docker = pipeline("docker", Path(tmp) / "docker")
        mirror = Path(tmp) / "docker" / "s3"
        s3_objects = sum(1 for p in mirror.rglob("*") if p.is_file())
        # the docker run's files belong to uid 1000; removing them needs no root here
    result = {
        "bench": "containers",
        "image_cpu_gb": round(image_gb(RUNTIME_CPU), 3),
        "image_mlflow_gb": round(image_gb(MLFLOW), 3),
        "build_cold_s": round(cold, 1) if cold is not None else None,
        "build_warm_s": round(warm, 1),
        "pipeline_subprocess_s": round(sub, 1),
        "pipeline_docker_s": round(docker, 1),
        "ratio": round(docker / sub, 3),
        "s3_objects": s3_objects,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
