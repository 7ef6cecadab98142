"""``packed_sdpa`` computes what transformers' SDPA computes on a packed continuous batch;
the server refuses a request that would be sampled unlike it asked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fastapi import HTTPException
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from refine_af import local_server
from refine_af.local_server import packed_sdpa, refuse_other_sampling

HEADS, KV_HEADS, DIM = 6, 2, 8


class Attention(nn.Module):
    num_key_value_groups = HEADS // KV_HEADS


def packed_batch(new: list[int], total: list[int]) -> dict:
    """Requests with ``total`` keys each, the last ``new`` of them queried this step, packed as
    continuous batching packs them: one row, cumulative lengths, a block-diagonal causal mask."""
    torch.manual_seed(0)
    cu_q = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(total).cumsum(0).tolist()], dtype=torch.int32)
    mask = torch.full((1, 1, sum(new), sum(total)), torch.finfo(torch.float32).min)
    for i, (q, k) in enumerate(zip(new, total, strict=True)):
        for j in range(q):
            mask[0, 0, cu_q[i] + j, cu_k[i] : cu_k[i] + k - q + j + 1] = 0
    return {
        "query": torch.randn(1, HEADS, sum(new), DIM),
        "key": torch.randn(1, KV_HEADS, sum(total), DIM),
        "value": torch.randn(1, KV_HEADS, sum(total), DIM),
        "attention_mask": mask,
        "cu_seq_lens_q": cu_q,
        "cu_seq_lens_k": cu_k,
    }


@pytest.mark.parametrize(
    ("new", "total"),
    [
        ([1, 1, 1], [5, 9, 2]),  # decode only
        ([4, 1, 3], [4, 7, 3]),  # prefills beside a decode
        ([2, 1], [6, 3]),  # a chunked prefill: queries at the end of a longer cache
        ([2, 1, 0], [2, 4, 0]),  # an empty padding request: as many requests as queries
    ],
)
def test_packed_sdpa_equals_sdpa_with_the_batch_mask(new: list[int], total: list[int]) -> None:
    batch = packed_batch(new, total)
    expected, _ = sdpa_attention_forward(Attention(), **batch, scaling=DIM**-0.5)
    actual, _ = packed_sdpa(Attention(), **batch, scaling=DIM**-0.5)
    assert actual.shape == expected.shape == (1, sum(new), HEADS, DIM)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_what_is_not_a_packed_batch_goes_to_transformers_sdpa(monkeypatch) -> None:
    """A padded batch (in-process generate) carries no cumulative lengths; sliding windows
    and dropout are left to transformers."""
    calls = []
    monkeypatch.setattr(
        local_server, "sdpa_attention_forward", lambda *a, **k: calls.append(k) or ("stock", None)
    )
    batch = packed_batch([1, 1], [3, 4])
    padded = {k: batch[k] for k in ("query", "key", "value", "attention_mask")}
    windowed = Attention()
    windowed.sliding_window = 2
    assert packed_sdpa(Attention(), **padded, scaling=1.0)[0] == "stock"
    assert packed_sdpa(windowed, **batch, scaling=1.0)[0] == "stock"
    assert packed_sdpa(Attention(), **batch, dropout=0.1)[0] == "stock"
    assert len(calls) == 3
    assert packed_sdpa(Attention(), **batch, scaling=1.0)[0].shape == (1, 2, HEADS, DIM)
    assert len(calls) == 3


def test_a_request_sampling_unlike_the_first_is_refused() -> None:
    """transformers' continuous batching samples every request with the first one's config."""
    started = []
    init_cb = refuse_other_sampling(lambda manager, model, config: started.append(config))
    manager = SimpleNamespace()
    greedy = SimpleNamespace(do_sample=False, temperature=None, top_p=None, top_k=None)
    sampled = SimpleNamespace(do_sample=True, temperature=0.7, top_p=0.5, top_k=None)
    init_cb(manager, None, greedy)
    init_cb(manager, None, greedy)
    with pytest.raises(HTTPException) as refused:
        init_cb(manager, None, sampled)
    assert refused.value.status_code == 400
    assert "asks do_sample=True, temperature=0.7, top_p=0.5." in refused.value.detail
    assert "--continuous-batching" in refused.value.detail
    assert started == [greedy, greedy]
