"""``transformers serve`` for local generation, with per-request attention for its continuous
batching.

transformers' continuous batching packs every request of a step into one row and, without a
flash-attention kernel (on a CPU), hands SDPA one dense mask over all of them: each query is
scored against every request's keys and the other requests' scores are masked away. The
result is right, but on 2 cores that wasted work cost as much as the model's matrix
multiplications, and the served path ran at 0.6 of the in-process batched one with 32
requests in flight. ``packed_sdpa`` computes each request's attention over its own keys,
from the cumulative lengths the batch already carries. It is registered under
transformers' ``sdpa`` name in the server's process only; anything that is not a packed
CPU batch goes to transformers' own SDPA (and ``--attn-implementation eager`` or a flash
kernel bypasses it).

The server also refuses (HTTP 400) a request whose sampling differs from the first one it
served with continuous batching: transformers keeps that first request's generation config
for every later request, which would otherwise sample them differently without a word.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
import typer
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# What transformers' continuous batching takes from the first request for all of them.
SHARED_SAMPLING = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def _is_packed(module, query, key, value, mask, dropout, kwargs) -> bool:
    """A continuous-batching step on the CPU: one packed row, cumulative lengths and the
    batch's mask; no sliding window, sinks, soft-cap, bias or dropout, which are left to
    transformers' SDPA."""
    return (
        query.device.type == "cpu"
        and query.shape[0] == 1
        and torch.is_tensor(kwargs.get("cu_seq_lens_q"))
        and torch.is_tensor(kwargs.get("cu_seq_lens_k"))
        and torch.is_tensor(mask)
        and key.shape[-1] == value.shape[-1]
        and dropout == 0.0
        and getattr(module, "sliding_window", None) is None
        and kwargs.get("sliding_window") is None
        and not hasattr(module, "sinks")
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
    )


def _decode(query, key, value, cu_k, scaling):
    """Every request has one query: one batched SDPA over each request's keys, gathered into
    a padded row, instead of a Python loop; a KV head's query heads are packed beside it
    ([n, kv_heads, groups, dim]), so the keys are not repeated per query head."""
    n, kv_heads, dim = cu_k.numel() - 1, key.shape[1], key.shape[3]
    lengths = (cu_k[1:] - cu_k[:-1]).long()
    positions = torch.arange(int(lengths.max()), device=key.device)
    valid = positions[None, :] < lengths[:, None]
    rows = torch.where(valid, cu_k[:-1, None].long() + positions[None, :], 0).view(-1)
    k, v = (
        x[0].transpose(0, 1).index_select(0, rows).view(n, -1, kv_heads, dim).permute(0, 2, 1, 3)
        for x in (key, value)
    )
    q = query[0].transpose(0, 1).reshape(n, kv_heads, -1, dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], scale=scaling)
    return out.reshape(1, n, -1, dim)


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, tokens, dim]
    key: torch.Tensor,  # [1, kv_heads, keys, dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # [1, 1, tokens, keys]: block-diagonal
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA over a packed continuous batch, request by request; output [1, tokens, heads, dim]."""
    if not _is_packed(module, query, key, value, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask,
            dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs,
        )  # fmt: skip
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    n = cu_q.numel() - 1
    if query.shape[2] == n and bool((cu_q.diff() == 1).all()):
        return _decode(query, key, value, cu_k, scaling), None
    # Query rows past the last request (padding) stay zero; nothing reads them.
    out = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for i in range(n):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        if q1 == q0:
            continue
        # The batch's mask cut to this request (causal within it); a single query sees all
        # of its request's keys, so it needs none.
        mask = attention_mask[..., q0:q1, k0:k1] if q1 - q0 > 1 else None
        part = F.scaled_dot_product_attention(
            query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1],
            attn_mask=mask, scale=scaling, enable_gqa=True,
        )  # fmt: skip
        out[:, q0:q1] = part.transpose(1, 2)
    return out, None


def refuse_other_sampling(init_cb):
    """Wrap transformers serve's ``init_cb`` (called with every continuous-batching request's
    generation config) so that a request sampling unlike the first is refused, not resampled."""
    from fastapi import HTTPException

    def checked(manager, model, gen_config):
        asked = {name: getattr(gen_config, name, None) for name in SHARED_SAMPLING}
        first = manager.__dict__.setdefault("_first_sampling", asked)
        if asked != first:
            other = [name for name in SHARED_SAMPLING if asked[name] != first[name]]
            raise HTTPException(
                status_code=400,
                detail="this continuous-batching server samples every request like its first "
                f"one ({', '.join(f'{n}={first[n]}' for n in other)}); this request asks "
                f"{', '.join(f'{n}={asked[n]}' for n in other)}. Start one server per sampling "
                "setting, or one without --continuous-batching",
            )
        return init_cb(manager, model, gen_config)

    return checked


def main(args: list[str] | None = None) -> None:
    """``transformers serve``, same flags, with ``packed_sdpa`` for continuous batching."""
    from transformers.cli.serve import Serve
    from transformers.cli.serving.utils import CBGenerateManager

    AttentionInterface.register("sdpa", packed_sdpa)
    CBGenerateManager.init_cb = refuse_other_sampling(CBGenerateManager.init_cb)
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(
        help="transformers serve (its flags, below) for refine-af's `generation.backend: "
        "openai` on this machine. With --continuous-batching, each packed request's attention "
        "is computed over its own keys (the same result as transformers' one masked product "
        "over all requests, with far less work on a CPU), and a request that samples unlike "
        "the first is refused (HTTP 400) instead of being sampled like it.\n\n"
        + (inspect.getdoc(Serve) or "")
    )(Serve)
    app(args=args, prog_name="python -m refine_af.local_server")


if __name__ == "__main__":
    main()
