"""Self-Instruct's ROUGE-L novelty filter vs ``refine_af.textsim.RougeLIndex``, side by side.

Reference: Self-Instruct's ``bootstrap_instructions.py`` — per candidate, a fresh
``multiprocessing.Pool`` maps ``rouge_scorer.score`` over the whole pool. Ours: the
pruned index. Both run on the same synthetic pool (variants of the 175 seed
instructions, so near-duplicates are common, as in a real run); ours must give identical
scores and decisions. The last line printed is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import time
from functools import partial
from pathlib import Path

import numpy as np
from rouge_score import rouge_scorer

from refine_af.textsim import RougeLIndex

SEED_TASKS = Path(__file__).resolve().parents[1] / "refine_af" / "data" / "seed_tasks.jsonl"
THRESHOLD = 0.7  # Self-Instruct keeps a candidate only if no pool item scores above this


def load_seeds() -> tuple[list[str], list[str]]:
    """Seed instructions, and a vocabulary from all seed text (instances too) for edits."""
    instructions, vocabulary = [], set()
    for line in SEED_TASKS.read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        instructions.append(task["instruction"])
        texts = [task["instruction"]] + [v for inst in task["instances"] for v in inst.values()]
        vocabulary.update(word for text in texts for word in text.split())
    return instructions, sorted(vocabulary)


def variant(seeds: list[str], vocabulary: list[str], rng: random.Random) -> str:
    """A seed instruction with a random share of word drops, swaps, insertions, replacements.

    The share is skewed low, so many variants are near-duplicates and some are novel.
    """
    words = rng.choice(seeds).split()
    if rng.random() < 0.1:  # splice two seeds, as a model mixing its prompt examples would
        other = rng.choice(seeds).split()
        words = words[: len(words) // 2] + other[len(other) // 2 :]
    for _ in range(max(1, round(rng.betavariate(1.2, 2.5) * len(words)))):
        op, at = rng.random(), rng.randrange(len(words))
        if op < 0.25 and len(words) > 1:
            del words[at]
        elif op < 0.35 and at + 1 < len(words):
            words[at], words[at + 1] = words[at + 1], words[at]
        elif op < 0.65:
            words.insert(at, rng.choice(vocabulary))
        else:
            words[at] = rng.choice(vocabulary)
    return " ".join(words)


def variants(seeds: list[str], vocabulary: list[str], n: int, rng: random.Random) -> list[str]:
    return [variant(seeds, vocabulary, rng) for _ in range(n)]


def reference_scores(candidates: list[str], pool: list[str], processes: int) -> list[list[float]]:
    """Self-Instruct's loop: a new process pool per candidate, scoring every pool item."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    results = []
    for inst in candidates:
        with multiprocessing.Pool(processes) as p:
            rouge_scores = p.map(partial(scorer.score, inst), pool)
        results.append([score["rougeL"].fmeasure for score in rouge_scores])
    return results


def matches_reference(
    index: RougeLIndex, pool: list[str], candidate: str, reference: list[float]
) -> bool:
    """Same max (and its index), decision, top 10 (ties in pool order) and mean as rouge_score."""
    best, item = index.max_similarity(candidate)
    order = sorted(range(len(reference)), key=lambda i: (-reference[i], i))[:10]
    return (
        abs(best - max(reference)) <= 1e-12
        and reference[item] == max(reference)
        and index.exceeds(candidate, THRESHOLD) == (max(reference) > THRESHOLD)
        and index.top_k(candidate, 10) == [(pool[i], reference[i]) for i in order]
        and abs(index.mean_similarity(candidate) - float(np.mean(reference))) <= 1e-12
    )


def time_queries(index: RougeLIndex, candidates: list[str]) -> float:
    """Seconds for the filter's per-candidate questions: best match and the top 10."""
    start = time.perf_counter()
    for candidate in candidates:
        index.max_similarity(candidate)
        index.top_k(candidate, 10)
    return time.perf_counter() - start


def bootstrap_filter(seeds: list[str], candidates: list[str]) -> tuple[float, int]:
    """Seconds to filter ``candidates`` from the seeds up, as stage 1 does; and how many kept.

    Each kept candidate also gets its top 10 and mean similarity, which stage 1 records.
    """
    start = time.perf_counter()
    index = RougeLIndex(seeds)
    for candidate in candidates:
        if not index.exceeds(candidate, THRESHOLD):
            index.top_k(candidate, 10)
            index.mean_similarity(candidate)
            index.add(candidate)
    return time.perf_counter() - start, len(index) - len(seeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=20000, help="pool size")
    parser.add_argument("--sample", type=int, default=20, help="candidates for the reference")
    parser.add_argument("--timed", type=int, default=2000, help="candidates timed for ours")
    parser.add_argument("--candidates-50k", type=int, default=50000, help="filter candidates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers", type=int, default=4, help="reference processes (Self-Instruct: Pool(4))"
    )
    args = parser.parse_args()

    seeds, vocabulary = load_seeds()
    rng = random.Random(args.seed)
    pool = (seeds + variants(seeds, vocabulary, args.pool, rng))[: args.pool]
    candidates = variants(seeds, vocabulary, max(args.sample, args.timed), rng)
    sample = candidates[: args.sample]

    start = time.perf_counter()
    reference = reference_scores(sample, pool, args.workers)
    reference_pairs_per_s = len(sample) * len(pool) / (time.perf_counter() - start)
    print(f"reference: {reference_pairs_per_s:,.0f} pairs/s", flush=True)

    start = time.perf_counter()
    index = RougeLIndex(pool)
    print(f"index of {len(pool)} built in {time.perf_counter() - start:.2f}s", flush=True)
    identical = all(
        matches_reference(index, pool, c, r) for c, r in zip(sample, reference, strict=True)
    )
    rejected = sum(max(r) > THRESHOLD for r in reference)
    print(f"identical: {identical} ({rejected}/{len(sample)} sampled rejected)", flush=True)
    ours_pairs_per_s = len(candidates) * len(pool) / time_queries(index, candidates)
    print(f"ours: {ours_pairs_per_s:,.0f} pairs/s over {len(candidates)} candidates", flush=True)

    filter_rng = random.Random(args.seed + 1)
    stream = variants(seeds, vocabulary, args.candidates_50k, filter_rng)
    filter_s, kept = bootstrap_filter(seeds, stream)
    print(f"filter: {len(stream)} candidates, {kept} kept, {filter_s:.1f}s", flush=True)

    print(
        json.dumps(
            {
                "bench": "rouge_filter",
                "pool": len(pool),
                "ours_pairs_per_s": round(ours_pairs_per_s),
                "reference_pairs_per_s": round(reference_pairs_per_s),
                "ratio": round(ours_pairs_per_s / reference_pairs_per_s, 1),
                "identical": identical,
                "filter_50k_s": round(filter_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
