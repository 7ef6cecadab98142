"""Batched generation vs one prompt at a time, with the bundled model on stage 3's prompts.

Reference: the same ``TransformersBackend`` with batch size 1, i.e. a loop that calls
``generate`` once per prompt. Ours: length-sorted, left-padded batches (stage 3's
setting, batch 16). Both decode greedily with the same token limit on the same prompts
(stage 3's instance-writing prompts for the bundled seed instructions), after one warm-up
call each. Throughput counts the tokens each completion kept (up to its EOS), so the
padding a batch carries after a sequence ends does not count for it. The last line
printed is one JSON object; the target is ratio ≥ 5.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import torch

from refine_af import models, records
from refine_af.data import seed_tasks_path
from refine_af.generation import SamplingParams, TransformersBackend
from refine_af.instances_format import build_prompt
from refine_af.records import SeedTask

MODEL = "smollm2-135m-instruct"


def prompts(count: int) -> list[str]:
    seeds = records.read_records(seed_tasks_path(), SeedTask)[:count]
    return [build_prompt(s.instruction, s.is_classification) for s in seeds]


def tokens_per_second(
    backend: TransformersBackend, batch: Sequence[str], params: SamplingParams
) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds) of generating for every prompt, after a warm-up call."""
    backend.generate(batch[: backend.batch_size], params)
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = models.load_tokenizer(MODEL)
    model = models.load_causal_lm(MODEL, device="cpu")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    batch = prompts(args.prompts)
    batched = TransformersBackend(tokenizer, model, batch_size=args.batch_size)
    single = TransformersBackend(tokenizer, model, batch_size=1)
    batched_rate, batched_tokens, batched_s = tokens_per_second(batched, batch, params)
    print(f"batched ({args.batch_size}): {batched_tokens} tokens in {batched_s:.1f} s")
    single_rate, single_tokens, single_s = tokens_per_second(single, batch, params)
    print(f"one at a time: {single_tokens} tokens in {single_s:.1f} s")
    result = {
        "bench": "generation",
        "batched_tok_s": round(batched_rate, 2),
        "single_tok_s": round(single_rate, 2),
        "ratio": round(batched_rate / single_rate, 2),
        "model": MODEL,
        "prompts": len(batch),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
