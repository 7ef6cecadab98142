"""Batched generation vs one prompt at a time vs a serving engine, with the bundled model on
stage 3's prompts.

Reference: the same ``TransformersBackend`` with batch size 1, i.e. a loop that calls
``generate`` once per prompt. Ours: length-sorted, left-padded batches (stage 3's
setting, batch 16). The endpoint path: the ``openai`` backend with its default requests in
flight (``generation.endpoint.max_concurrency``; ``--in-flight`` to change), against
``transformers serve`` on 127.0.0.1 as ``python -m refine_af.local_server`` starts it (with
per-request attention for continuous batching), serving the same model folder in float32,
once without and once with its continuous batching (``--continuous-batching``, plus
``--cb-flags``), each started fresh and warmed up with one round of requests.
All decode greedily with the same token limit on the same prompts (stage 3's
instance-writing prompts for the bundled seed instructions). Throughput counts the tokens
each completion kept (in-process: up to its EOS; server: its usage count). The last line
printed is one JSON object; the targets are ratio ≥ 5 and endpoint_cb_tok_s ≥ batched_tok_s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from refine_af import models, records
from refine_af.config import EndpointSettings
from refine_af.data import seed_tasks_path
from refine_af.endpoint import OpenAIBackend
from refine_af.generation import GenerationBackend, SamplingParams, TransformersBackend
from refine_af.instances_format import build_prompt
from refine_af.records import SeedTask

MODEL = "smollm2-135m-instruct"
SERVER = "refine_af.local_server"


def prompts(count: int) -> list[str]:
    seeds = records.read_records(seed_tasks_path(), SeedTask)[:count]
    return [build_prompt(s.instruction, s.is_classification) for s in seeds]


@contextmanager
def served(model_dir: str, *extra: str, stock: bool = False) -> Iterator[str]:
    """``python -m refine_af.local_server`` (``stock``: plain ``transformers serve``) on a free
    loopback port; its /v1 URL, stopped afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    entry = ["-m", "transformers.cli.transformers", "serve"] if stock else ["-m", SERVER]
    command = [sys.executable, *entry, model_dir,
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--dtype", "float32", *extra]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None:
                    sys.exit(
                        f"transformers serve {' '.join(extra)} exited with {server.returncode}"
                    )
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(timeout=60)


def tokens_per_second(
    backend: GenerationBackend, batch: Sequence[str], params: SamplingParams, warm_up: int
) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds) of generating for every prompt, after a warm-up call."""
    backend.generate(batch[:warm_up], params)
    started = time.perf_counter()
    completions = backend.generate(batch, params)
    seconds = time.perf_counter() - started
    tokens = sum(c.num_tokens for c in completions)
    return tokens / seconds, tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32, help="prompts generated for")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--in-flight", type=int, default=None,
                        help="requests the endpoint backend keeps in flight "
                        "(default: generation.endpoint.max_concurrency, "
                        f"{EndpointSettings().max_concurrency})")  # fmt: skip
    parser.add_argument("--cb-flags", default="",
                        help="extra `transformers serve` flags for the continuous-batching "
                        "server, e.g. '--cb-num-blocks 64 --cb-max-batch-tokens 512'")  # fmt: skip
    parser.add_argument("--stock-server", action="store_true",
                        help="serve with plain `transformers serve` (its own attention) instead "
                        f"of {SERVER}, to compare")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = models.load_tokenizer(MODEL)
    model = models.load_causal_lm(MODEL, device="cpu")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    batch = prompts(args.prompts)
    batched = TransformersBackend(tokenizer, model, batch_size=args.batch_size)
    single = TransformersBackend(tokenizer, model, batch_size=1)
    size = args.batch_size
    batched_rate, batched_tokens, batched_s = tokens_per_second(batched, batch, params, size)
    print(f"batched ({size}): {batched_tokens} tokens in {batched_s:.1f} s")
    single_rate, single_tokens, single_s = tokens_per_second(single, batch, params, 1)
    print(f"one at a time: {single_tokens} tokens in {single_s:.1f} s")
    del model, batched, single  # the servers get the cores and the memory to themselves
    model_dir = models.resolve(MODEL)
    endpoint_rates = {}
    cb_flags = ("--continuous-batching", *args.cb_flags.split())
    in_flight = args.in_flight or EndpointSettings().max_concurrency
    for name, flags in (("endpoint", ()), ("endpoint_cb", cb_flags)):
        with served(model_dir, *flags, stock=args.stock_server) as url:
            settings = EndpointSettings(
                base_url=url, server="transformers", max_concurrency=in_flight
            )
            endpoint = OpenAIBackend.from_settings(settings, model_dir)
            rate, tokens, seconds = tokens_per_second(endpoint, batch, params, size)
        endpoint_rates[name] = rate
        print(f"{name} ({in_flight} in flight): {tokens} tokens in {seconds:.1f} s")
    result = {
        "bench": "generation",
        "batched_tok_s": round(batched_rate, 2),
        "single_tok_s": round(single_rate, 2),
        "endpoint_tok_s": round(endpoint_rates["endpoint"], 2),
        "endpoint_cb_tok_s": round(endpoint_rates["endpoint_cb"], 2),
        "ratio": round(batched_rate / single_rate, 2),
        "endpoint_cb_vs_batched": round(endpoint_rates["endpoint_cb"] / batched_rate, 2),
        "model": MODEL,
        "prompts": len(batch),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "in_flight": in_flight,
        "cb_flags": args.cb_flags,
        "server": "transformers serve" if args.stock_server else SERVER,
        "threads": torch.get_num_threads(),
        "load_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
