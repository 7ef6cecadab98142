"""`run_local --runner docker` stops before starting anything, naming what is missing and
the command that fixes it (exit 2): no daemon, an image missing, the MLflow port taken."""

import socket
import subprocess
import sys
from pathlib import Path

import docker.errors
import pytest

from pipelines import containers

REPO = Path(__file__).parents[2]


def test_port_taken_names_the_option(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(containers.StackError, match=f"port {port} .*--mlflow-port"):
            containers.check_port_free(port)


def test_missing_images_name_make_images():
    class Images:
        def get(self, ref):
            if "mlflow" in ref:
                return object()
            raise docker.errors.ImageNotFound(ref)

    class Client:
        images = Images()

    with pytest.raises(containers.StackError) as error:
        containers.check_images(Client())
    assert "runtime-cpu" in str(error.value) and "s3-standin" in str(error.value)
    assert "mlflow:" not in str(error.value) and "fix: make images" in str(error.value)


def test_no_daemon_exits_2_with_the_fix(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.run_local", "--runner", "docker",
         "--workspace", str(tmp_path / "ws")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={"PATH": "/usr/bin:/bin", "DOCKER_HOST": f"unix://{tmp_path}/no.sock"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "daemon does not answer" in result.stderr and "dockerd" in result.stderr
    assert not (tmp_path / "ws").exists()  # nothing made before the checks
