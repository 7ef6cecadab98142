"""The local stack for ``make run-containers``: MLflow and an S3 stand-in in containers.

One user-defined docker network holds the MLflow server (the mlflow image: sqlite backend
store in ``<workspace>/mlflow``, artifacts in an S3 bucket) and moto's standalone server
(the s3-standin image), a local stand-in for the cluster's MinIO. Component containers
(kfp.local.DockerRunner, runtime-cpu image, uid 1000) join the network and get the
variable names the cluster's ConfigMap and Secret provide. Everything started here is
removed on exit; the bucket is mirrored into ``<workspace>/s3`` first, so data stays.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from components.images import MLFLOW, RUNTIME_CPU, S3_STANDIN

UID = 1000
BUCKET = "refine-af-artifacts"
REGION = "us-east-1"
# moto accepts any key; fixed local values, not secrets.
LOCAL_KEYS = {"AWS_ACCESS_KEY_ID": "refine-af-local", "AWS_SECRET_ACCESS_KEY": "refine-af-local"}
READY_TIMEOUT_S = 180


class StackError(RuntimeError):
    """A missing prerequisite: the message names it and the command that fixes it."""


@dataclass
class Stack:
    network: str
    mlflow_url: str  # from this host
    s3_url: str  # from this host
    component_env: dict[str, str]  # what component containers get
    hosts: dict[str, str]  # container name -> address on the network


def docker_client():
    """The docker SDK client, or a StackError saying how to get a daemon."""
    try:
        import docker
    except ImportError as err:
        raise StackError("the docker Python package is missing; fix: make setup") from err
    try:
        client = docker.from_env()
        client.ping()
    except Exception as err:
        raise StackError(
            "docker's daemon does not answer (docker info fails); fix: install docker "
            "(apt-get install docker.io) and start it (dockerd >/var/log/dockerd.log 2>&1 &)"
        ) from err
    return client


def docker_errors():
    import docker.errors

    return docker.errors


def check_images(client) -> None:
    missing = []
    for ref in (RUNTIME_CPU, MLFLOW, S3_STANDIN):
        try:
            client.images.get(ref)
        except docker_errors().ImageNotFound:
            missing.append(ref)
    if missing:
        raise StackError(f"image(s) missing: {', '.join(missing)}; fix: make images")


def check_port_free(port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as err:
            raise StackError(
                f"port {port} on 127.0.0.1 (MLflow UI) is taken; fix: --mlflow-port <free port> "
                f"(or 0 for any), or stop what listens there (ss -ltnp 'sport = :{port}')"
            ) from err


def own_workspace(workspace: Path) -> None:
    """Containers run as uid 1000: a root-run host hands them the workspace."""
    workspace.mkdir(parents=True, exist_ok=True)
    if os.getuid() != 0:
        return
    for path in [workspace, *workspace.rglob("*")]:
        if path.lstat().st_uid != UID:
            os.lchown(path, UID, UID)


def _host_port(container, port: str = "5000/tcp") -> int:
    container.reload()
    return int(container.attrs["NetworkSettings"]["Ports"][port][0]["HostPort"])


def _address(container, network: str) -> str:
    container.reload()
    return container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]


def _wait_http(url: str, what: str, container) -> None:
    import urllib.request

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                if response.status < 500:
                    return
        except OSError:
            container.reload()
            if container.status == "exited":
                break
            time.sleep(1)
    logs = container.logs(tail=20).decode(errors="replace")
    raise StackError(f"{what} did not become ready at {url}; its last log lines:\n{logs}")


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=LOCAL_KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_KEYS["AWS_SECRET_ACCESS_KEY"],
    )


def list_objects(endpoint: str) -> list[str]:
    paginator = s3_client(endpoint).get_paginator("list_objects_v2")
    return [
        o["Key"] for page in paginator.paginate(Bucket=BUCKET) for o in page.get("Contents", [])
    ]


def mirror_bucket(endpoint: str, target: Path) -> int:
    """Copy every object into ``target`` (moto keeps them in memory only)."""
    client = s3_client(endpoint)
    keys = list_objects(endpoint)
    for key in keys:
        path = target / key
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(path))
    return len(keys)


@contextmanager
def stack(workspace: Path, mlflow_port: int = 5000) -> Iterator[Stack]:
    """Network, S3 stand-in and MLflow up for the block; all of it removed afterwards."""
    client = docker_client()
    check_images(client)
    if mlflow_port:
        check_port_free(mlflow_port)
    own_workspace(workspace / "mlflow")
    suffix = uuid.uuid4().hex[:8]
    network = client.networks.create(f"refine-af-{suffix}", driver="bridge")
    started, bucket_at = [], ""
    try:
        s3_name, mlflow_name = f"refine-af-s3-{suffix}", f"refine-af-mlflow-{suffix}"
        s3 = client.containers.run(
            S3_STANDIN, name=s3_name, network=network.name, detach=True, user=f"{UID}:{UID}",
            ports={"5000/tcp": ("127.0.0.1", None)},
        )  # fmt: skip
        started.append(s3)
        s3_url = f"http://127.0.0.1:{_host_port(s3)}"
        _wait_http(s3_url, "the S3 stand-in (moto server)", s3)
        s3_client(s3_url).create_bucket(Bucket=BUCKET)
        bucket_at = s3_url
        # Names go to /etc/hosts too: docker's embedded DNS takes seconds per lookup when
        # no upstream resolver answers, longer than the steps' MLflow probe allows.
        hosts = {s3_name: _address(s3, network.name)}
        inside = {
            "AWS_ENDPOINT_URL": f"http://{s3_name}:5000",
            "MLFLOW_S3_ENDPOINT_URL": f"http://{s3_name}:5000",
            "AWS_DEFAULT_REGION": REGION,
            **LOCAL_KEYS,
        }
        # The cluster's server flags (k8s/base/mlflow/deployment.yaml): artifacts proxied
        # to S3; the Host header must be the container's name or localhost.
        allowed = f"{mlflow_name},{mlflow_name}:5000,localhost,localhost:*,127.0.0.1,127.0.0.1:*"
        mlflow = client.containers.run(
            MLFLOW,
            command=[
                "--host", "0.0.0.0", "--port", "5000", "--serve-artifacts",
                "--backend-store-uri", "sqlite:////data/mlflow.db",
                "--artifacts-destination", f"s3://{BUCKET}/mlflow",
                "--allowed-hosts", allowed,
            ],
            name=mlflow_name, network=network.name, detach=True, user=f"{UID}:{UID}",
            environment=inside, ports={"5000/tcp": ("127.0.0.1", mlflow_port or None)},
            extra_hosts=dict(hosts),
            volumes={str(workspace / "mlflow"): {"bind": "/data", "mode": "rw"}},
        )  # fmt: skip
        started.append(mlflow)
        mlflow_url = f"http://127.0.0.1:{_host_port(mlflow)}"
        hosts[mlflow_name] = _address(mlflow, network.name)
        _wait_http(f"{mlflow_url}/health", "the MLflow server", mlflow)
        # The first store request initialises the backend (slow on a busy machine); the
        # steps' reachability probe allows only seconds, so it is made here first.
        _wait_http(
            f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1",
            "the MLflow server's store", mlflow,
        )  # fmt: skip
        env = {
            **inside,
            "MLFLOW_TRACKING_URI": f"http://{mlflow_name}:5000",
            "REFINE_AF_ARTIFACT_BUCKET": BUCKET,
            "TOKENIZERS_PARALLELISM": "false",
            "GIT_PYTHON_REFRESH": "quiet",  # no git in the image; MLflow would warn per run
        }
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if name in os.environ:
                env[name] = os.environ[name]
        yield Stack(network.name, mlflow_url, s3_url, env, hosts)
    finally:
        if bucket_at:  # what was written stays, whether or not the run finished
            mirror_bucket(bucket_at, workspace / "s3" / BUCKET)
        network.reload()
        for container in [*network.containers, *started]:
            # already gone: component containers remove themselves
            with contextlib.suppress(docker_errors().NotFound):
                container.remove(force=True)
        network.remove()
        if os.getuid() == 0:
            own_workspace(workspace)


def docker_runner(stack_: Stack, stage_workspace: Path, pipeline_run: str):
    """Steps as uid 1000 on the stack's network; ``stage_workspace`` must be mounted
    (inside the pipeline root: kfp's own workspace_root is deleted after every run).
    ``pipeline_run`` names this run for the cached steps that find its MLflow parent by it,
    as the pod's workflow label does on a cluster (refine_af.tracking.PIPELINE_RUN_ENV)."""
    from kfp import local

    from refine_af import tracking

    env = {
        **stack_.component_env,
        "REFINE_AF_WORKSPACE": str(stage_workspace),
        tracking.PIPELINE_RUN_ENV: pipeline_run,
    }
    return local.DockerRunner(
        network=stack_.network, user=f"{UID}:{UID}", environment=env, extra_hosts=stack_.hosts
    )
