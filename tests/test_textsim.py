"""refine_af.textsim must reproduce rouge_score's rougeL exactly, pruning notwithstanding."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from rouge_score import rouge_scorer

from refine_af.textsim import RougeLIndex, rouge_l_f, tokenize

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
SEED_TASKS = Path(__file__).resolve().parents[1] / "refine_af" / "data" / "seed_tasks.jsonl"
WORDS = sorted(
    {
        word
        for line in SEED_TASKS.read_text(encoding="utf-8").splitlines()
        for word in json.loads(line)["instruction"].split()
    }
)
COMMON = ["a", "the", "of", "to", "and", "is", "Write", "give"]  # repeats make LCS ambiguous
ODD = [
    "",
    " ",
    "\n\t",
    "...",
    "!?",
    "İstanbul",
    "Kelvin",
    "straße",
    "naïve",
    "café",
    "日本語",
    "😀",
    "１２３",
    "x²",
    "C++",
    "e-mail",
    "don't",
    "U.S.A.",
    "3.14",
    "100%",
    "#tag",
    "ǅ",
]


def reference(target: str, prediction: str) -> float:
    return SCORER.score(target, prediction)["rougeL"].fmeasure


def random_text(rng: random.Random) -> str:
    """Mostly word lists with repeats, mixed case and digits; sometimes odd characters."""
    parts = []
    for _ in range(rng.choice([0, 1, 2, 3, 5, 8, 12, 20, 30])):
        roll = rng.random()
        if roll < 0.6:
            word = rng.choice(COMMON if rng.random() < 0.5 else WORDS)
        elif roll < 0.75:
            word = rng.choice(ODD)
        elif roll < 0.85:
            word = str(rng.randrange(1000))
        else:
            word = "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randint(1, 4)))
        parts.append(word.upper() if rng.random() < 0.1 else word)
    separators = [" ", " ", " ", ", ", "-", "\n", "", "  "]
    return "".join(p + rng.choice(separators) for p in parts)


def variant(text: str, rng: random.Random) -> str:
    """A near-duplicate, so indexes hold the high scores the filter cares about."""
    words = text.split()
    for _ in range(rng.randint(0, 3)):
        if words and rng.random() < 0.5:
            del words[rng.randrange(len(words))]
        else:
            words.insert(rng.randint(0, len(words)), rng.choice(COMMON + WORDS[:50]))
    return " ".join(words)


def test_tokenize_is_rouge_scores() -> None:
    tokenizer = SCORER._tokenizer
    for text in [*ODD, "Hello, WORLD! 42 times", "a_b a-b a.b"]:
        assert tokenize(text) == tokenizer.tokenize(text)


def test_rouge_l_f_matches_rouge_score_on_random_pairs() -> None:
    rng = random.Random(1234)
    texts = [random_text(rng) for _ in range(2000)]
    for _ in range(12000):
        a = rng.choice(texts)
        b = variant(a, rng) if rng.random() < 0.3 else rng.choice(texts)
        assert rouge_l_f(a, b) == reference(a, b), (a, b)  # bit-exact, not just within 1e-12


@pytest.mark.parametrize(
    ("target_len", "prediction_len", "lcs"), [(10, 10, 7), (15, 25, 14), (5, 15, 7), (4, 16, 7)]
)
def test_decisions_on_the_threshold_match(target_len: int, prediction_len: int, lcs: int) -> None:
    """Scores that are exactly 0.7 in real arithmetic are where float order matters."""
    shared = [f"w{i}" for i in range(lcs)]
    target = " ".join(shared + [f"t{i}" for i in range(target_len - lcs)])
    prediction = " ".join([f"p{i}" for i in range(prediction_len - lcs)] + shared)
    index = RougeLIndex([prediction])
    assert index.exceeds(target, 0.7) == (reference(target, prediction) > 0.7)
    assert index.max_similarity(target)[0] == reference(target, prediction)


@pytest.fixture(scope="module")
def pool_and_queries() -> tuple[list[str], list[str]]:
    rng = random.Random(99)
    base = [random_text(rng) for _ in range(60)]
    pool = [variant(rng.choice(base), rng) for _ in range(240)]
    pool += [*pool[:5], "", "!!!"]  # exact duplicates (ties) and token-less items
    queries = [variant(rng.choice(base), rng) for _ in range(40)]
    queries += [random_text(rng) for _ in range(10)] + ["", "zzz unseen tokens only", pool[3]]
    return pool, queries


def brute_force(query: str, pool: list[str]) -> list[float]:
    return [reference(query, item) for item in pool]


def test_index_equals_brute_force(pool_and_queries: tuple[list[str], list[str]]) -> None:
    pool, queries = pool_and_queries
    index = RougeLIndex(pool)
    for query in queries:
        expected = brute_force(query, pool)
        ranked = sorted(range(len(pool)), key=lambda i: (-expected[i], i))
        assert index.scores(query).tolist() == expected
        assert index.max_similarity(query) == (expected[ranked[0]], ranked[0])
        for k in (1, 3, 10, len(pool) + 5):
            assert index.top_k(query, k) == [(pool[i], expected[i]) for i in ranked[:k]]
        for threshold in (-0.1, 0.0, 0.3, 0.5, 0.7, 0.9, 1.0):
            assert index.exceeds(query, threshold) == (max(expected) > threshold)
        assert index.mean_similarity(query) == float(np.mean(expected))


def test_ties_go_to_the_earlier_item_even_with_a_lower_bound() -> None:
    """Item 1 (bound 1.0) is scored first, but item 0 (bound 0.75) ties it and wins."""
    index = RougeLIndex(["a b c x", "d a b c"])
    assert index.max_similarity("a b c d") == (0.75, 0)
    assert index.top_k("a b c d", 1) == [("a b c x", 0.75)]


def test_pruning_skips_pairs_without_changing_answers(
    pool_and_queries: tuple[list[str], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    pool, _ = pool_and_queries
    index = RougeLIndex(pool)
    exact_calls = []
    score = RougeLIndex._score
    monkeypatch.setattr(
        RougeLIndex, "_score", lambda self, q, i: exact_calls.append(i) or score(self, q, i)
    )
    assert index.exceeds(pool[7], 0.7)
    assert len(exact_calls) == 1  # the duplicate has the highest bound and ends the query
    exact_calls.clear()
    assert index.top_k(pool[7], 3)[0] == (pool[7], 1.0)
    assert len(exact_calls) < len(pool) // 4


def test_empty_pool() -> None:
    index = RougeLIndex()
    assert len(index) == 0
    assert index.max_similarity("anything at all") == (0.0, -1)
    assert index.top_k("anything at all") == []
    assert not index.exceeds("anything at all", 0.7)
    assert index.mean_similarity("anything at all") == 0.0
    assert index.scores("anything").tolist() == []


def test_add_is_incremental(pool_and_queries: tuple[list[str], list[str]]) -> None:
    pool, queries = pool_and_queries
    whole = RougeLIndex(pool)
    grown = RougeLIndex(pool[:100])
    for text in pool[100:]:
        grown.add(text)
    assert len(grown) == len(whole)
    for query in queries:
        assert grown.top_k(query, 5) == whole.top_k(query, 5)
    novel = "Quixotic zephyrs vex 777 jumbled wombats"
    assert grown.max_similarity(novel)[0] < 0.5  # cached; the add below must invalidate it
    grown.add(novel)
    assert grown.max_similarity(novel) == (1.0, len(pool))
    assert grown.exceeds(novel, 0.99)
    assert grown.scores(queries[0])[:-1].tolist() == whole.scores(queries[0]).tolist()
