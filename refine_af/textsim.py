"""Exact, fast ROUGE-L for Self-Instruct's novelty filter.

Self-Instruct keeps a candidate instruction only if its ROUGE-L F (``rouge_score``'s
``rougeL``, no stemmer) with every instruction already in the pool is <= 0.7, computing
every pair in pure Python. This module gives the same scores bit for bit — same tokenizer,
same floating-point arithmetic — but computes the longest common subsequence in C
(rapidfuzz) and, for the filter and the top-k, skips every pair whose cheap upper bound
shows it cannot matter.

Argument order follows ``RougeScorer.score(target, prediction)``: the candidate is the
target, the pool item the prediction (as in Self-Instruct's ``partial(scorer.score, inst)``).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score.tokenizers import DefaultTokenizer

__all__ = ["RougeLIndex", "rouge_l_f", "tokenize"]

_TOKENIZER = DefaultTokenizer(use_stemmer=False)
_SURROGATES = 0x800  # code points 0xD800-0xDFFF are skipped when ids become characters
_MAX_TOKEN_ID = 0x10FFFF - _SURROGATES


def tokenize(text: str) -> list[str]:
    """rouge_score's own default tokenizer (no stemmer), so tokens can never drift from it."""
    return _TOKENIZER.tokenize(text)


def _fmeasure(lcs: int, target_len: int, prediction_len: int) -> float:
    """ROUGE-L F with rouge_score's operations in rouge_score's order, so floats match exactly."""
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _fmeasure_array(lcs: np.ndarray, target_len: int, prediction_len: np.ndarray) -> np.ndarray:
    """`_fmeasure` over arrays; numpy's IEEE float64 ops round exactly as Python's do.

    An empty side gives 0/0 = nan, so ``total > 0`` fails and the score is 0, as in rouge_score.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / prediction_len
        recall = lcs / target_len
        total = precision + recall
        fmeasure = 2 * precision * recall / total
    return np.where(total > 0, fmeasure, 0.0)


def _char(token_id: int) -> str:
    """One character per token id: rapidfuzz's LCS on str is bit-parallel and hash-free."""
    if token_id > _MAX_TOKEN_ID:
        raise ValueError(f"more than {_MAX_TOKEN_ID + 1} distinct tokens")
    return chr(token_id if token_id < 0xD800 else token_id + _SURROGATES)


def rouge_l_f(target: str, prediction: str) -> float:
    """Exactly ``RougeScorer(["rougeL"]).score(target, prediction)["rougeL"].fmeasure``."""
    target_tokens, prediction_tokens = tokenize(target), tokenize(prediction)
    vocab: dict[str, int] = {}
    encoded = [
        "".join(_char(vocab.setdefault(t, len(vocab))) for t in tokens)
        for tokens in (target_tokens, prediction_tokens)
    ]
    lcs = LCSseq.similarity(encoded[0], encoded[1])
    return _fmeasure(lcs, len(target_tokens), len(prediction_tokens))


def _descending(bound: np.ndarray, above: float, chunk: int = 64) -> Iterator[int]:
    """Items with ``bound > above``, highest bound first, ties in pool order.

    Sorted lazily, ``chunk`` at a time, as a query usually stops within the first few.
    """
    items = np.flatnonzero(bound > above)
    while len(items):
        values = bound[items]
        if len(items) > chunk:
            head = values >= np.partition(values, len(items) - chunk)[len(items) - chunk]
        else:
            head = np.ones(len(items), dtype=bool)
        yield from items[head][np.argsort(-values[head], kind="stable")].tolist()
        items = items[~head]


class _IntBuffer:
    """Append-only int array with amortised O(1) appends and a zero-copy view."""

    def __init__(self) -> None:
        self._data = np.empty(8, dtype=np.int64)
        self._size = 0

    def append(self, value: int) -> None:
        if self._size == len(self._data):
            self._data = np.resize(self._data, 2 * self._size)
        self._data[self._size] = value
        self._size += 1

    def view(self) -> np.ndarray:
        return self._data[: self._size]


@dataclass(frozen=True)
class _Query:
    """A candidate prepared against the pool as it was when the query was made."""

    text: str
    pool_size: int
    seq: str  # the candidate's known tokens as characters; unknown ones can never match
    length: int  # all its tokens, known or not: the ROUGE denominator
    bound: np.ndarray  # per pool item, an upper bound on the exact F


class RougeLIndex:
    """A growing pool of texts answering ROUGE-L queries exactly, pruned by upper bounds.

    For each candidate, the bound ``F(U)`` with ``U = Σ_t min(count_cand[t], count_item[t])``
    (which never exceeds the LCS's length bound ``min(len_a, len_b)``) is computed for the
    whole pool at once from an inverted index, with the same float operations as the score.
    F rises with the LCS in steps of ``2 / (len_a + len_b)``, far above rounding error, so
    ``F(U)`` bounds the true float score and pruning never changes an answer. Only items whose
    bound can still matter get an exact LCS, highest bound first, so a near-duplicate ends a
    filter query after one comparison.

    Token ids become characters for rapidfuzz, which caps the vocabulary at 1,112,064 tokens.
    """

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self._texts: list[str] = []
        self._seqs: list[str] = []
        self._lengths = _IntBuffer()
        self._vocab: dict[str, int] = {}
        self._postings: list[tuple[_IntBuffer, _IntBuffer]] = []  # per token: items, counts
        self._last: _Query | None = None
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self._texts)

    def add(self, text: str) -> None:
        """Append ``text`` to the pool; later queries compare against it too."""
        item = len(self._texts)
        tokens = tokenize(text)
        ids = [self._token_id(t) for t in tokens]
        for token_id, count in Counter(ids).items():
            items, counts = self._postings[token_id]
            items.append(item)
            counts.append(count)
        self._texts.append(text)
        self._seqs.append("".join(map(_char, ids)))
        self._lengths.append(len(tokens))

    def _token_id(self, token: str) -> int:
        token_id = self._vocab.setdefault(token, len(self._vocab))
        if token_id == len(self._postings):
            self._postings.append((_IntBuffer(), _IntBuffer()))
        return token_id

    def _query(self, candidate: str) -> _Query:
        """Prepare ``candidate``; the last one is cached, as the filter asks several questions."""
        last = self._last
        if last is not None and last.text == candidate and last.pool_size == len(self):
            return last
        tokens = tokenize(candidate)
        known = [self._vocab[t] for t in tokens if t in self._vocab]
        overlap = np.zeros(len(self), dtype=np.int64)
        for token_id, count in Counter(known).items():
            items, counts = self._postings[token_id]
            overlap[items.view()] += np.minimum(counts.view(), count)
        bound = _fmeasure_array(overlap, len(tokens), self._lengths.view())
        self._last = _Query(candidate, len(self), "".join(map(_char, known)), len(tokens), bound)
        return self._last

    def _score(self, query: _Query, item: int) -> float:
        lcs = LCSseq.similarity(query.seq, self._seqs[item])
        return _fmeasure(lcs, query.length, int(self._lengths.view()[item]))

    def exceeds(self, candidate: str, threshold: float) -> bool:
        """Whether any pool item scores > ``threshold``; stops at the first that does."""
        query = self._query(candidate)
        items = _descending(query.bound, threshold)
        return any(self._score(query, item) > threshold for item in items)

    def top_k(self, candidate: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` pool texts most similar to ``candidate``, best first, ties in pool order."""
        return [(self._texts[item], score) for item, score in self._top(candidate, k)]

    def max_similarity(self, candidate: str) -> tuple[float, int]:
        """Best score and its pool index (first one on ties); ``(0.0, -1)`` on an empty pool."""
        best = self._top(candidate, 1)
        return (best[0][1], best[0][0]) if best else (0.0, -1)

    def _top(self, candidate: str, k: int) -> list[tuple[int, float]]:
        """Top ``k`` (item, score) pairs.

        Items are scored in descending bound order until the next bound falls below the
        k-th best score so far; an item sharing no token with the candidate scores exactly 0.
        """
        if k <= 0:
            return []
        query = self._query(candidate)
        heap: list[tuple[float, int]] = []  # (score, -item): the root is the weakest kept
        bound = query.bound
        for item in _descending(bound, 0.0):
            if len(heap) == k and bound[item] < heap[0][0]:
                break
            entry = (self._score(query, item), -item)
            if len(heap) < k:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                heapq.heapreplace(heap, entry)
        ranked = [(-neg, score) for score, neg in sorted(heap, reverse=True)]
        zeros = np.flatnonzero(bound <= 0)[: max(0, k - len(ranked))]
        return ranked + [(int(item), 0.0) for item in zeros]

    def scores(self, candidate: str) -> np.ndarray:
        """Exact score against every pool item, in pool order (no pruning: all are needed)."""
        query = self._query(candidate)
        lcs = process.cdist([query.seq], self._seqs, scorer=LCSseq.similarity, dtype=np.int64)
        return _fmeasure_array(lcs[0], query.length, self._lengths.view())

    def mean_similarity(self, candidate: str) -> float:
        """Mean score over the whole pool, as Self-Instruct's ``np.mean``; 0.0 on an empty pool."""
        return float(np.mean(self.scores(candidate))) if len(self) else 0.0
