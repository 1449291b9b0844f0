"""Causal attention within each packed document (intra-document masking), without an S x S mask.

Letters: h heads (query heads; key/value heads may be fewer with GQA), S packed tokens (B = 1),
Dh head dim, N documents; ``cu_seqlens`` [N + 1] document offsets (0, ..., S).

On CUDA with half-precision inputs this is FlashAttention's variable-length kernel
(``torch.nn.attention.varlen.varlen_attn``) when this torch has it; otherwise SDPA runs
causally on each document in turn, which is exact, needs no mask and keeps memory linear in S.
Both give the same result as a dense block-diagonal causal mask (the tests check it).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F


def _varlen_attn():
    """torch's varlen FlashAttention entry and how to ask it for causal masking, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        return varlen_attn, {"window_size": (-1, 0)}
    if "is_causal" in params:
        return varlen_attn, {"is_causal": True}
    return None


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens: torch.Tensor, scale: float, enable_gqa: bool = False,
                            dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention restricted to each document of a packed row.

    Args:
        q: [1, h, S, Dh]; k, v: [1, h_kv, S, Dh] (h_kv divides h when ``enable_gqa``).
        cu_seqlens: [N + 1] integer offsets (0 = first, S = last).
        scale: softmax scale (1/sqrt(Dh)).
    Returns: [1, h, S, Dh].
    Raises: ValueError for a batch dimension other than 1 or offsets not ending at S.
    """
    if q.shape[0] != 1:
        raise ValueError(f"packed attention needs batch 1 (documents along S), got {q.shape[0]}")
    S = q.shape[2]
    offsets = [int(x) for x in cu_seqlens.tolist()]
    if offsets[0] != 0 or offsets[-1] != S:
        raise ValueError(f"cu_seqlens must run from 0 to {S}, got {offsets[0]}..{offsets[-1]}")
    varlen = _varlen_attn() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if varlen is not None and dropout_p == 0.0:
        fn, causal = varlen
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
        out = fn(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                 max(lengths), max(lengths), scale=scale, enable_gqa=enable_gqa, **causal)
        return out.transpose(0, 1).unsqueeze(0)
    out = torch.empty_like(q)
    for a, b in zip(offsets[:-1], offsets[1:]):
        if b > a:
            out[:, :, a:b] = F.scaled_dot_product_attention(
                q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, dropout_p=dropout_p,
                scale=scale, enable_gqa=enable_gqa)
    return out


def dense_document_mask(cu_seqlens: torch.Tensor, total: int,
                        device: torch.device | None = None) -> torch.Tensor:
    """Boolean [S, S] mask, True = may attend: causal within each document (the reference)."""
    doc = torch.zeros(total, dtype=torch.long, device=device)
    doc[cu_seqlens[1:-1].to(device)] = 1
    doc = doc.cumsum(0)
    same = doc[:, None] == doc[None, :]
    return same & torch.ones(total, total, dtype=torch.bool, device=device).tril()
