"""`refine-af submit` against a fake KFP client: it compiles the pipeline for the profile,
registry and tag asked for, and a failed or timed-out run ends with exit 1, the run's URL
and the step, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import yaml
from cli_runner import cli_output

REPO = Path(__file__).resolve().parents[1]
HOST = "http://localhost:30880"


class FakeClient:
    """Records what submit sends; answers as configured."""

    instances: ClassVar[list[FakeClient]] = []
    outcome = "SUCCEEDED"  # or "FAILED", "TIMEOUT", "REFUSED", "HTTP_500", "LOST"

    def __init__(self, host: str):
        self.host = host
        self.package_text = ""
        self.arguments: dict = {}
        FakeClient.instances.append(self)

    def create_run_from_pipeline_package(self, package, arguments, **_):
        if self.outcome == "REFUSED":
            raise ConnectionError("[Errno 111] Connection refused")
        if self.outcome == "HTTP_500":
            raise _api_error(500, "Internal Server Error")
        self.package_text = Path(package).read_text()
        self.arguments = arguments
        return SimpleNamespace(run_id="run-123")

    def _run(self, state: str):
        tasks = [
            {"display_name": "root", "state": state},
            {"display_name": "plan", "state": "SUCCEEDED"},
            {"display_name": "instructions",
             "state": "RUNNING" if state != "FAILED" else "SUCCEEDED"},
            {"display_name": "rlaf", "state": "FAILED" if state == "FAILED" else "PENDING",
             "error": {"message": "OOMKilled"} if state == "FAILED" else None},
        ]  # fmt: skip
        return SimpleNamespace(state=state, run_details={"task_details": tasks})

    def wait_for_run_completion(self, run_id, timeout):
        if self.outcome == "TIMEOUT":
            raise TimeoutError("Run timeout")
        if self.outcome == "LOST":
            raise _api_error(503, "Service Unavailable")
        return self._run(self.outcome)

    def get_run(self, run_id):
        return self._run("RUNNING")


def _api_error(status: int, reason: str) -> Exception:
    """What the KFP client raises for an HTTP error: its text spans several lines."""
    from kfp_server_api import ApiException

    error = ApiException(status=status, reason=reason)
    error.headers = {"Content-Type": "application/json", "Date": "today"}
    error.body = b'{"error": "pipeline store down",\n "code": 13}'
    assert len(str(error).splitlines()) > 1
    return error


@pytest.fixture
def fake_kfp(monkeypatch):
    import kfp

    FakeClient.instances = []
    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.chdir(REPO)
    return FakeClient


def _submit(monkeypatch, capsys, *args):
    return cli_output(monkeypatch, capsys, "submit", "--host", HOST, *args)


def test_cpu_profile_compiles_with_the_registry_and_tag(fake_kfp, monkeypatch, capsys):
    before = (REPO / "pipelines" / "refine_af.yaml").read_bytes()
    code, out, err = _submit(
        monkeypatch, capsys, "--profile", "cpu", "--registry", "kind.local/me", "--tag", "dev"
    )
    assert code == 0, err
    [client] = fake_kfp.instances
    images = set(re.findall(r"image: (\S+)", client.package_text))
    assert images == {"kind.local/me/runtime-cpu:dev"}
    assert "nvidia.com/gpu" not in client.package_text
    assert client.arguments["gpus"] == 1 and client.arguments["shards"] == 2
    assert yaml.safe_load(client.arguments["config"])["name"]
    assert f"{HOST}/#/runs/details/run-123" in out
    assert (REPO / "pipelines" / "refine_af.yaml").read_bytes() == before  # never rewritten


def test_registry_and_tag_come_from_the_environment(fake_kfp, monkeypatch, capsys):
    monkeypatch.setenv("REFINE_AF_IMAGE_REGISTRY", "registry.example/team")
    monkeypatch.setenv("REFINE_AF_IMAGE_TAG", "1.2.3")
    code, _, err = _submit(monkeypatch, capsys, "--gpus", "4")
    assert code == 0, err
    [client] = fake_kfp.instances
    assert set(re.findall(r"image: (\S+)", client.package_text)) == {
        "registry.example/team/runtime-cpu:1.2.3",
        "registry.example/team/runtime-gpu:1.2.3",
    }
    assert client.arguments["gpus"] == 4


def test_a_timeout_exits_1_with_the_url_and_the_pending_steps(fake_kfp, monkeypatch, capsys):
    fake_kfp.outcome = "TIMEOUT"
    try:
        code, _, err = _submit(monkeypatch, capsys, "--profile", "cpu", "--wait", "--timeout", "5")
    finally:
        fake_kfp.outcome = "SUCCEEDED"
    assert code == 1
    assert "Traceback" not in err
    assert f"{HOST}/#/runs/details/run-123" in err
    assert "not finished after 5 s" in err and "instructions (RUNNING)" in err
    assert "rlaf (PENDING)" in err and "plan" not in err


def test_a_failed_run_exits_1_with_the_failed_step(fake_kfp, monkeypatch, capsys):
    fake_kfp.outcome = "FAILED"
    try:
        code, _, err = _submit(monkeypatch, capsys, "--profile", "cpu", "--wait")
    finally:
        fake_kfp.outcome = "SUCCEEDED"
    assert code == 1 and "Traceback" not in err
    assert "run FAILED" in err and "failed step: rlaf (FAILED: OOMKilled)" in err
    assert f"{HOST}/#/runs/details/run-123" in err


def test_an_unreachable_cluster_exits_1_in_one_line(fake_kfp, monkeypatch, capsys):
    fake_kfp.outcome = "REFUSED"
    try:
        code, _, err = _submit(monkeypatch, capsys, "--profile", "cpu")
    finally:
        fake_kfp.outcome = "SUCCEEDED"
    assert code == 1 and "Traceback" not in err
    assert f"could not submit to {HOST}" in err and "Connection refused" in err


@pytest.mark.parametrize(
    ("outcome", "args", "message"),
    [
        ("HTTP_500", [], f"could not submit to {HOST}: HTTP 500 Internal Server Error: "),
        ("LOST", ["--wait"], f"lost {HOST} while waiting for the run: {HOST}/#/runs/details/"),
    ],
)
def test_an_api_error_exits_1_in_one_line(fake_kfp, monkeypatch, capsys, outcome, args, message):
    fake_kfp.outcome = outcome
    try:
        code, _, err = _submit(monkeypatch, capsys, "--profile", "cpu", *args)
    finally:
        fake_kfp.outcome = "SUCCEEDED"
    assert code == 1 and "Traceback" not in err
    assert message in err and '{"error": "pipeline store down", "code": 13}' in err
    assert "headers" not in err


def test_api_errors_are_told_in_one_line():
    from pipelines.submit import one_line

    text = one_line(_api_error(500, "Internal Server Error"))
    assert text == 'HTTP 500 Internal Server Error: {"error": "pipeline store down", "code": 13}'
    assert one_line(ConnectionError("refused\n  twice")) == "refused twice"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "tpu"], "--profile must be cpu or gpu"),
        (["--gpus", "0"], "--gpus must be at least 1"),
        (["--profile", "cpu", "--gpus", "2"], "--gpus 2 needs --profile gpu"),
        (["--package", "nope.yaml"], "nope.yaml: compiled pipeline not found"),
        (["--gpu-node-label", "no-equals"], "key=value"),
    ],
)
def test_bad_options_exit_2_before_anything_is_sent(fake_kfp, monkeypatch, capsys, args, message):
    code, _, err = _submit(monkeypatch, capsys, *args)
    assert code == 2 and message in err
    assert not any(c.package_text for c in fake_kfp.instances)


def test_a_generation_endpoint_compiles_served_placement(fake_kfp, monkeypatch, capsys):
    """Stage 1 and the base-policy shards only send prompts to the server: no GPU for them."""
    url = "http://vllm.refine-af.svc.cluster.local:8000/v1"
    code, _, err = _submit(monkeypatch, capsys, "--generation-endpoint", url)
    assert code == 0, err
    [client] = fake_kfp.instances
    assert client.arguments["generation_endpoint"] == url
    spec = next(yaml.safe_load_all(client.package_text))
    executors = spec["deploymentSpec"]["executors"]
    on_cpu = {n for n, e in executors.items() if "accelerator" not in e["container"]["resources"]}
    assert "exec-instructions" in on_cpu and "exec-rlaf" not in on_cpu
