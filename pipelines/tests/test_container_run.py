"""The whole pipeline in containers: images built (cached layers on reruns), then the
tiny-settings pipeline under kfp.local.DockerRunner with MLflow and the S3 stand-in."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.tests.test_local_run import TINY, _only, check_promotion

REPO = Path(__file__).parents[2]
UID = 1000


def _docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def images():
    if not _docker_answers():
        if os.environ.get("CI"):
            pytest.fail("no docker daemon answers; .ci/run starts one")
        pytest.skip("no docker daemon answers (start one: dockerd &)")
    started = time.monotonic()
    subprocess.run([str(REPO / "scripts" / "build-images.sh")], check=True, timeout=3600)
    print(f"images built in {time.monotonic() - started:.0f} s")


@pytest.mark.container
@pytest.mark.slow
def test_pipeline_runs_in_containers(tmp_path, images):
    workspace = tmp_path / "workspace"
    command = [sys.executable, "-m", "pipelines.run_local", "--runner", "docker",
               "--mlflow-port", "0", "--workspace", str(workspace), "--shards", "2"]  # fmt: skip
    for override in TINY:
        command += ["--set", override]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=2400)
    print(f"pipeline in containers: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    out = result.stdout
    assert "S3 objects written" in out and "MLflow UI during the run: http://127.0.0.1:" in out

    kfp = _only(workspace / "kfp", "refine-af-*")
    summary = json.loads((_only(kfp, "instructions/pool") / "summary.json").read_text())
    assert summary["accepted"] == 4
    assert (_only(kfp, "rlaf/policy") / "adapter" / "adapter_config.json").is_file()
    assert len(sorted(kfp.glob("for-loop-*-iteration-*/instances*/examples"))) == 4
    datasets = sorted(kfp.glob("merge*/dataset"))
    policies = {json.loads((d / "summary.json").read_text())["policy"] for d in datasets}
    assert policies == {"rl", "base"}
    assert len(sorted(kfp.glob("sft*/model/adapter/adapter_config.json"))) == 2
    comparison = json.loads((_only(kfp, "evaluate/results") / "comparison.json").read_text())
    assert comparison["tasks"] == 2

    # MLflow: the server's store stays in the workspace; the gate decided as the comparison says
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow' / 'mlflow.db'}")
    check_promotion(kfp, client, comparison, out)
    for version in client.search_model_versions("name = 'refine-af-model'"):
        assert version.source.startswith(("s3://", "mlflow-artifacts:", "models:/"))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get("refine_af.stage") == "pipeline")
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied to S3
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.tags["refine_af.stage"] for r in children}
    assert stages >= {"instructions", "rlaf", "instances", "instances-merge", "sft", "evaluate"}

    # S3: the bucket, mirrored into the workspace before the stand-in was removed
    objects = [p for p in (workspace / "s3" / "refine-af-artifacts").rglob("*") if p.is_file()]
    assert objects
    names = {p.name for p in objects}
    assert "adapter_config.json" in names or "MLmodel" in names

    # uid 1000 everywhere, nothing root-owned, nothing left running
    owners = {p.lstat().st_uid for p in [workspace, *workspace.rglob("*")]}
    assert owners == {UID}, owners
    leftovers = subprocess.run(
        ["docker", "ps", "-a", "--filter", "name=refine-af-", "-q"], capture_output=True, text=True
    ).stdout.split()
    networks = subprocess.run(
        ["docker", "network", "ls", "--filter", "name=refine-af-", "-q"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert leftovers == [] and networks == []
