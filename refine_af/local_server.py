"""``transformers serve`` for local generation, with per-request attention for its continuous
batching.

transformers' continuous batching packs every request of a step into one row and, without a
flash-attention kernel (on a CPU), hands SDPA one dense mask over all of them: each query is
scored against every request's keys and most of the work is masked away. With 16 requests
in flight that cross-request attention cost as much as the model's matrix multiplications,
and the served path ran at 0.6 of the in-process batched one (docs/deploy.md).
``packed_sdpa`` computes the same attention request by request from the cumulative lengths
the batch already carries. It is registered under transformers' ``sdpa`` name in the
server's process only; anything that is not a packed batch goes to transformers' own SDPA.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
import typer
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def _is_packed(module: torch.nn.Module, query: torch.Tensor, mask: object, kwargs: dict) -> bool:
    """A continuous-batching step this function computes exactly: one packed row, cumulative
    lengths, a mask for the chunks, and no sliding window, sinks, soft-cap or bias."""
    return (
        query.shape[0] == 1
        and torch.is_tensor(kwargs.get("cu_seq_lens_q"))
        and torch.is_tensor(kwargs.get("cu_seq_lens_k"))
        and torch.is_tensor(mask)
        and getattr(module, "sliding_window", None) is None
        and not hasattr(module, "sinks")
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
    )


def _decode(query, key, value, cu_k, scaling):
    """One query per request: each request's keys gathered into a padded row of a batch."""
    n, kv_heads, dim = cu_k.numel() - 1, key.shape[1], key.shape[3]
    lengths = (cu_k[1:] - cu_k[:-1]).long()
    positions = torch.arange(int(lengths.max()), device=key.device)
    valid = positions[None, :] < lengths[:, None]
    rows = torch.where(valid, cu_k[:-1, None].long() + positions[None, :], 0).view(-1)
    k, v = (
        x[0].transpose(0, 1).index_select(0, rows).view(n, -1, kv_heads, dim).permute(0, 2, 1, 3)
        for x in (key, value)
    )
    # A KV head's query heads side by side: [n, kv_heads, groups, dim], no repeated keys.
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
    if not _is_packed(module, query, attention_mask, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask,
            dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs,
        )  # fmt: skip
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    n = cu_q.numel() - 1
    if query.shape[2] == n and int(cu_q[-1]) == n:
        return _decode(query, key, value, cu_k, scaling), None
    out = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for i in range(n):
        q0, q1, k0, k1 = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        if q1 == q0:
            continue
        # The batch's mask restricted to this request: causal within it, nothing across.
        mask = attention_mask[..., q0:q1, k0:k1] if q1 - q0 > 1 else None
        part = F.scaled_dot_product_attention(
            query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1],
            attn_mask=mask, scale=scaling, enable_gqa=True,
        )  # fmt: skip
        out[:, q0:q1] = part.transpose(1, 2)
    return out, None


def main(args: list[str] | None = None) -> None:
    """``transformers serve``, same flags, with ``packed_sdpa`` for continuous batching."""
    from transformers.cli.serve import Serve

    AttentionInterface.register("sdpa", packed_sdpa)
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(
        help="transformers serve (its flags, below) with per-request attention for "
        "--continuous-batching: each packed request attends to its own tokens only. "
        "For refine-af's `generation.backend: openai` on this machine.\n\n"
        + (inspect.getdoc(Serve) or "")
    )(Serve)
    app(args=args, prog_name="python -m refine_af.local_server")


if __name__ == "__main__":
    main()
