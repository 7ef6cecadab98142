"""The OpenAI-compatible backend against a real ``transformers serve`` on 127.0.0.1.

The server is transformers' own (``pip install transformers[serving]``), started as users
start it here (``python -m refine_af.local_server``), serving the bundled model from its
local folder on the CPU in float32, as the in-process backend runs it.
Failures (refused, 5xx, timeout, wrong model) come from small servers on loopback too.
"""

from __future__ import annotations

import http.server
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import pytest
from cli_runner import cli_output

from refine_af import locking, records
from refine_af.config import EndpointSettings, load_config
from refine_af.data import seed_tasks_path
from refine_af.endpoint import TOP_LOGPROBS, OpenAIBackend, yes_share
from refine_af.errors import EndpointUnavailable, InputError
from refine_af.feedback import JudgeScorer
from refine_af.generation import SamplingParams, TransformersBackend, backend_for
from refine_af.instances_format import Instance, build_prompt
from refine_af.records import SeedTask


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_server(*flags: str) -> Iterator[str]:
    """``python -m refine_af.local_server`` on 127.0.0.1; its /v1 base URL, stopped after."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "refine_af.local_server", "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--dtype", "float32", *flags],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"transformers serve did not start: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def served(bundled_model_dir: Path) -> Iterator[str]:
    """The server without continuous batching (one ``generate`` per request). Stopped after
    the module."""
    with local_server() as url:
        yield url


def endpoint_overrides(base_url: str, **extra: object) -> list[str]:
    settings = {"base_url": base_url, "server": "transformers", "max_retries": 1} | extra
    return [
        "generation.backend=openai",
        *(f"generation.endpoint.{k}={v}" for k, v in settings.items()),
    ]


def stage3_prompts(count: int) -> list[str]:
    seeds = records.read_records(seed_tasks_path(), SeedTask)[:count]
    return [build_prompt(s.instruction, s.is_classification) for s in seeds]


@pytest.fixture(scope="module")
def in_process(bundled_model_dir: Path) -> TransformersBackend:
    return TransformersBackend.from_reference(str(bundled_model_dir), device="cpu", batch_size=8)


def assert_equal_completions(endpoint: OpenAIBackend, in_process: TransformersBackend, chat: bool):
    prompts = stage3_prompts(8)
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop=("\n\n",))
    remote = endpoint.generate(prompts, params, chat=chat)
    local = in_process.generate(prompts, params, chat=chat)
    assert [c.text for c in remote] == [c.text for c in local]
    # The one tolerated difference: transformers serve says "length" whenever its token
    # count reaches max_tokens (its completion handler's hit_max), even when a stop string
    # ended the text at that last token; the texts are equal all the same.
    near_limit = [c.num_tokens >= params.max_new_tokens - 1 for c in local]
    assert [r.finish_reason for r, near in zip(remote, near_limit, strict=True) if not near] == [
        c.finish_reason for c, near in zip(local, near_limit, strict=True) if not near
    ]
    assert not all(near_limit)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True])
def test_temperature_0_completions_equal_in_process(
    served: str, bundled_model_dir: Path, in_process: TransformersBackend, chat: bool
) -> None:
    endpoint = OpenAIBackend.from_settings(
        EndpointSettings(base_url=served, server="transformers", max_concurrency=4),
        str(bundled_model_dir),
    )
    assert_equal_completions(endpoint, in_process, chat)


@pytest.mark.integration
@pytest.mark.slow
def test_continuous_batching_completions_equal_in_process(
    bundled_model_dir: Path, in_process: TransformersBackend
) -> None:
    """Eight requests in flight share the server's batches and answer as in-process; a request
    that samples unlike the first is refused, not sampled like the first."""
    with local_server("--continuous-batching") as url:
        endpoint = OpenAIBackend.from_settings(
            EndpointSettings(base_url=url, server="transformers", max_concurrency=8),
            str(bundled_model_dir),
        )
        assert_equal_completions(endpoint, in_process, chat=False)
        sampled = SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.5)
        with pytest.raises(EndpointUnavailable, match="HTTP 400: this continuous-batching"):
            endpoint.generate(stage3_prompts(1), sampled)


@pytest.mark.integration
@pytest.mark.slow
def test_stage1_runs_through_the_server(
    served: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "instructions"
    code, _, err = cli_output(
        monkeypatch, capsys, "stage", "instructions", "--out", str(out),
        "--workspace", str(tmp_path / "ws"),
        "--set", "stage1.num_instructions=2", "--set", "stage1.prompts_per_round=2",
        "--set", "stage1.max_new_tokens=48", "--set", "stage1.max_rounds=3",
        *(f"--set={o}" for o in endpoint_overrides(served)),
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["candidates"] > 0
    assert (out / "instructions.jsonl").is_file()


@pytest.mark.integration
@pytest.mark.slow
def test_stage5_through_the_server_scores_as_in_process(
    served: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    args = ["--tasks", "2", "--per-task", "2", "--set", "stage5.max_new_tokens=16"]
    common = ["--workspace", str(tmp_path / "ws"), "--model", "smollm2-135m-instruct"]
    code, _, err = cli_output(
        monkeypatch, capsys, "stage", "evaluate", "--out", str(tmp_path / "remote"),
        *common, *args, *(f"--set={o}" for o in endpoint_overrides(served)),
    )  # fmt: skip
    assert code == 0, err
    code, _, err = cli_output(
        monkeypatch, capsys, "stage", "evaluate", "--out", str(tmp_path / "local"),
        *common, *args,
    )  # fmt: skip
    assert code == 0, err

    def predictions(folder: str) -> list[str]:
        lines = (tmp_path / folder / "candidate" / "predictions.jsonl").read_text().splitlines()
        return [json.loads(line)["prediction"] for line in lines]

    assert len(predictions("remote")) == 4
    assert predictions("remote") == predictions("local")


def test_adapter_falls_back_in_process_where_the_server_cannot_serve_it(
    tiny_lora_adapter_dir: Path, tiny_causal_lm_dir: Path, capsys
) -> None:
    """transformers serve loads full model folders only; nothing is sent to it."""
    config = load_config(
        "local-cpu",
        [f"model.base={tiny_causal_lm_dir}", *endpoint_overrides("http://127.0.0.1:9/v1")],
    )
    backend = backend_for(config, str(tiny_lora_adapter_dir))
    assert isinstance(backend, TransformersBackend)
    assert f"generating with {tiny_lora_adapter_dir} in-process" in capsys.readouterr().err
    assert isinstance(backend_for(config), OpenAIBackend)


class AdapterServer(http.server.BaseHTTPRequestHandler):
    """vLLM's adapter route and completions, as far as the backend uses them: records the
    adapter it is asked to load, or refuses it (400) like a vLLM that cannot read the path."""

    refuse = False
    loaded: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.endswith("/load_lora_adapter"):
            if self.refuse:
                self._answer(400, {"message": "cannot read the adapter"})
                return
            type(self).loaded.append(body)
            self._answer(200, "ok")
            return
        known = {entry["lora_name"] for entry in self.loaded}
        if body["model"] not in known:
            self._answer(404, {"message": f"model {body['model']} does not exist"})
            return
        self._answer(200, {
            "id": "1", "object": "text_completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "text": "Hi", "finish_reason": "length", "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })  # fmt: skip

    def _answer(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("refuse", [False, True])
def test_vllm_adapter_is_loaded_and_named_as_the_model(
    refuse: bool, tiny_lora_adapter_dir: Path, tiny_causal_lm_dir: Path, capsys
) -> None:
    handler = type("Handler", (AdapterServer,), {"refuse": refuse, "loaded": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        config = load_config(
            "local-cpu",
            [
                f"model.base={tiny_causal_lm_dir}",
                *endpoint_overrides(url, server="vllm", max_retries=0),
            ],
        )
        backend = backend_for(config, str(tiny_lora_adapter_dir))
    finally:
        server.shutdown()
        server.server_close()
    if refuse:
        assert isinstance(backend, TransformersBackend)
        assert "cannot serve adapter" in capsys.readouterr().err
    else:
        [loaded] = handler.loaded
        assert loaded["lora_path"] == str(tiny_lora_adapter_dir)
        assert isinstance(backend, OpenAIBackend) and backend.model == loaded["lora_name"]


# ---------------------------------------------------------------- failures


class FailingHandler(http.server.BaseHTTPRequestHandler):
    """500 to every request, or no answer for longer than the client waits."""

    mode = "500"
    requests = 0

    def do_POST(self) -> None:
        type(self).requests += 1
        if self.mode == "slow":
            time.sleep(3)  # the client has given up by then
            return
        body = json.dumps({"error": "boom"}).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_server() -> Iterator[tuple[str, type[FailingHandler]]]:
    handler = type("Handler", (FailingHandler,), {"requests": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("kind", "reason"),
    [("refused", "cannot connect"), ("500", "HTTP 500"), ("slow", "no answer within")],
)
def test_failing_endpoint_exits_1_naming_url_and_model(
    kind: str,
    reason: str,
    failing_server: tuple[str, type[FailingHandler]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    url, handler = failing_server
    handler.mode = kind
    if kind == "refused":
        url = f"http://127.0.0.1:{free_port()}/v1"
    out = tmp_path / "instructions"
    code, _, err = cli_output(
        monkeypatch, capsys, "stage", "instructions", "--out", str(out),
        "--workspace", str(tmp_path / "ws"),
        *(f"--set={o}" for o in endpoint_overrides(url, timeout=1, model="served-name")),
    )  # fmt: skip
    assert code == 1
    assert url in err and "'served-name'" in err and reason in err
    assert "after 1 retries" in err
    if kind != "refused":
        assert handler.requests >= 2  # the first try and the client's one retry, for a prompt
    # no output; the resume journal holds its start line only (stage 1 continues from it)
    written = {p.name for p in out.iterdir()} - {locking.LOCK_FILE, locking.HOLDER_FILE}
    assert written == {"journal.jsonl"}
    assert len((out / "journal.jsonl").read_text().splitlines()) == 1


@pytest.mark.integration
@pytest.mark.slow
def test_wrong_model_name_exits_1(
    served: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "eval"
    code, _, err = cli_output(
        monkeypatch, capsys, "stage", "evaluate", "--out", str(out),
        "--workspace", str(tmp_path / "ws"), "--tasks", "1", "--per-task", "1",
        *(f"--set={o}" for o in endpoint_overrides(served, model="no-such/model")),
    )  # fmt: skip
    assert code == 1
    assert served in err and "'no-such/model'" in err
    assert not out.exists() or not any(out.iterdir())


class LogprobsServer(AdapterServer):
    """vLLM's /v1/completions answer with top logprobs at the one answer token."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["max_tokens"] == 1 and body["logprobs"] == TOP_LOGPROBS
        top = {" Yes": -0.5, " No": -1.5, "No": -4.0, " Maybe": -2.0}
        logprobs = {"tokens": [" Yes"], "token_logprobs": [-0.5], "top_logprobs": [top],
                    "text_offset": [0]}  # fmt: skip
        self._answer(200, {
            "id": "1", "object": "text_completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "text": " Yes", "finish_reason": "length",
                         "logprobs": logprobs}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })  # fmt: skip


def test_judge_reads_p_yes_from_completion_logprobs() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LogprobsServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = EndpointSettings(
            base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", server="vllm"
        )
        judge = JudgeScorer(OpenAIBackend.from_settings(settings, "m"), "coherence", chat=False)
        scores = judge.score([Instance("Sort 3, 1.", "", "1, 3")] * 3)
    finally:
        server.shutdown()
        server.server_close()
    yes, no = math.exp(-0.5), math.exp(-1.5) + math.exp(-4.0)
    assert scores == [pytest.approx(yes / (yes + no))] * 3


def test_yes_share_adds_both_spellings() -> None:
    share = yes_share({"Yes": -1.0, " Yes": -2.0, "No": -1.5, "Maybe": -0.1})
    yes = 2.718281828**-1.0 + 2.718281828**-2.0
    assert share == pytest.approx(yes / (yes + 2.718281828**-1.5))
    assert yes_share({"Maybe": 0.0}) == 0.0


def test_endpoint_backend_needs_a_url() -> None:
    with pytest.raises(InputError, match=r"needs endpoint\.base_url"):
        load_config("local-cpu", ["generation.backend=openai"])
