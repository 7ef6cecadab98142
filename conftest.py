"""Shared fixtures for tests/, components/ and pipelines/.

Servers are real, bind 127.0.0.1 only, and stop when their scope ends.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

# Dummy credentials: moto accepts any, and they keep boto3 away from real ones.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MLFLOW_START_TIMEOUT_S = 180  # a loaded CI machine or laptop needs more than a minute
MODEL_SERVER_START_TIMEOUT_S = 240  # `mlflow models serve` loads the model before it answers

# No test may reach a model hub: models are bundled or built by the fixtures. Set before
# anything imports huggingface_hub, which reads the variable once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


# --- S3 (moto's standalone server) -------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port; yields its endpoint URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in AWS_TEST_ENV.items():
                patch.setenv(name, value)
            yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on ``s3_server``, with the endpoint and credentials in the env."""
    for name, value in {
        **AWS_TEST_ENV,
        "S3_ENDPOINT_URL": s3_server,
        "AWS_ENDPOINT_URL": s3_server,
    }.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return bucket


# --- MLflow tracking server (subprocess) -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = MLFLOW_START_TIMEOUT_S
) -> None:
    """Poll ``/health`` until it answers; fail with the server log if it dies or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    pytest.fail(f"server not healthy in {timeout} s:\n{log.read_text()}")


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and the workers it forked: they share its process group."""
    with contextlib.suppress(ProcessLookupError):  # the group may already be gone
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def start_http_server(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """``start(command_for(port), env)`` runs a real server on a free loopback port in its own
    process group and returns its URL once ``/health`` answers; the group stops after the test."""
    with contextlib.ExitStack() as stack:

        def start(command_for: Callable[[int], list[str]], env: dict[str, str]) -> str:
            port = _free_port()
            url, log = f"http://127.0.0.1:{port}", tmp_path / f"server-{port}.log"
            with open(log, "wb") as log_file:
                process = subprocess.Popen(
                    command_for(port), stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True, env=env,
                )  # fmt: skip
            stack.callback(_stop_group, process)
            _wait_healthy(url, process, log, timeout=MODEL_SERVER_START_TIMEOUT_S)
            return url

        yield start


def start_mlflow_server(
    root: Path, artifacts: str | None = None, env: dict[str, str] | None = None
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start a real ``mlflow server`` (sqlite backend, proxied artifacts) in ``root``;
    artifacts go to ``artifacts`` (default: a folder in ``root``), ``env`` adds variables."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", artifacts or str(root / "artifacts"),
    ]  # fmt: skip
    # No GenAI job runner: its 7 consumer processes add seconds to start and stop.
    server_env = {**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            env=server_env,
        )  # fmt: skip
    try:
        _wait_healthy(url, process, log)
    except BaseException:
        _stop_group(process)
        raise
    return url, process


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` shared by the session; yields its URL."""
    url, process = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield url
    finally:
        _stop_group(process)


@pytest.fixture
def doomed_mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A server of its own for one test, which the test may kill; yields (url, stop)."""
    url, process = start_mlflow_server(tmp_path_factory.mktemp("doomed-mlflow"))
    try:
        yield url, lambda: _stop_group(process)
    finally:
        _stop_group(process)


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A loopback port that accepts connections and never answers; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # the kernel completes handshakes; nobody ever reads or writes
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


# --- models --------------------------------------------------------------------------------

BUNDLED_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The bundled 135M instruct model as a safetensors folder (dequantized once, cached)."""
    from refine_af import models

    return Path(models.resolve(BUNDLED_MODEL))


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(bundled_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama with the bundled model's tokenizer (fast tests)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    target = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


# --- MLflow server whose artifact store is S3 (moto) ---------------------------------------


@pytest.fixture(scope="session")
def mlflow_s3_server(
    s3_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A real ``mlflow server`` (sqlite backend) proxying artifacts to a bucket on moto.

    Yields (server URL, bucket); the artifacts live under ``s3://bucket/mlartifacts``. The
    server process gets the S3 endpoint and the dummy credentials, the clients need neither.
    """
    root = tmp_path_factory.mktemp("mlflow-s3-server")
    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    env = {**AWS_TEST_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_server}
    url, process = start_mlflow_server(root, f"s3://{bucket}/mlartifacts", env)
    try:
        yield url, bucket
    finally:
        _stop_group(process)


@pytest.fixture(scope="session")
def tiny_lora_adapter_dir(
    tiny_causal_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A LoRA adapter of ``tiny_causal_lm_dir`` with random, non-zero A and B (it changes
    the outputs, unlike a freshly initialised one), saved with peft like stage 4's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    target = tmp_path_factory.mktemp("tiny-lora")
    get_peft_model(model, lora).save_pretrained(target)
    return target
