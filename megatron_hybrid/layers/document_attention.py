"""Causal attention within each packed document (intra-document masking), without an S x S mask.

Letters: h heads (query heads; key/value heads may be fewer with GQA), S packed tokens (B = 1),
Dh head dim, N documents; ``cu_seqlens`` [N + 1] document offsets (0, ..., S).

On CUDA with half-precision inputs this is FlashAttention's variable-length kernel
(``torch.nn.attention.varlen.varlen_attn``) when this torch has it, called with only the keywords
its signature accepts (they differ between torch releases; K/V heads are expanded for GQA when it
has no ``enable_gqa``); otherwise SDPA runs causally on each document in turn, which is exact,
needs no mask and keeps memory linear in S.
Both give the same result as a dense block-diagonal causal mask (the tests check it).
"""
from __future__ import annotations

import inspect
from itertools import pairwise

import torch
import torch.nn.functional as F


def varlen_call_spec(fn) -> tuple[dict, bool, bool] | None:
    """How to call a ``varlen_attn``-like function, read from its signature.

    torch's signature changed between releases: 2.11 takes ``window_size`` (causal = (-1, 0)) and
    has no GQA option (its kernel expects as many key/value heads as query heads); 2.13 adds
    ``enable_gqa``; early previews took ``is_causal``. Passing a keyword the installed one lacks
    is a TypeError, so only accepted keywords are ever passed.

    Returns: (causal keywords, accepts ``enable_gqa``, accepts ``scale``), or None when the
    function has no way to ask for causal masking.
    """
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return causal, "enable_gqa" in params, "scale" in params


def _torch_varlen_attn():
    """torch's varlen FlashAttention entry, or None when this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if varlen_call_spec(varlen_attn) is not None else None


def varlen_packed_attention(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    """Causal per-document attention through ``fn`` (``varlen_attn`` or a stand-in of its
    signature), passing only the keywords ``fn`` accepts.

    Args:
        q: [1, h, S, Dh]; k, v: [1, h_kv, S, Dh], h_kv dividing h (GQA: query head i reads
            key/value head i // (h / h_kv), as SDPA's ``enable_gqa``).
        cu_seqlens: [N + 1] document offsets; max_len: the longest document (tokens).
        scale: softmax scale.
    Returns: [1, h, S, Dh].
    Raises: ValueError when ``fn`` cannot be asked for causal masking, when it takes no
        ``scale`` and ``scale`` is not 1/sqrt(Dh) (its default), or when h_kv does not divide h.
    """
    spec = varlen_call_spec(fn)
    if spec is None:
        raise ValueError(f"{getattr(fn, '__name__', fn)} has neither window_size nor is_causal")
    causal, has_gqa, has_scale = spec
    h, h_kv, D = q.shape[1], k.shape[1], q.shape[-1]
    if h % h_kv:
        raise ValueError(f"query heads {h} are not a multiple of key/value heads {h_kv}")
    kwargs = dict(causal)
    if has_scale:
        kwargs["scale"] = scale
    elif abs(scale - D ** -0.5) > 1e-12 * D ** -0.5:
        raise ValueError(f"this varlen_attn takes no scale; {scale} is not 1/sqrt({D})")
    # [1, h, S, Dh] -> [S, h, Dh], varlen's (total tokens, heads, head dim); the attention layer's
    # tensors are [S, 1, h, Dh] underneath, so this is a view there (a copy only for other layouts)
    q3, k3, v3 = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    if h_kv != h:
        if has_gqa:
            kwargs["enable_gqa"] = True
        else:  # no GQA option: every query head gets its own copy of its group's K/V
            k3, v3 = (t.repeat_interleave(h // h_kv, dim=1) for t in (k3, v3))
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = fn(q3, k3, v3, cu, cu, max_len, max_len, **kwargs)
    return out.transpose(0, 1).unsqueeze(0)


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens: torch.Tensor, scale: float, enable_gqa: bool = False,
                            dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention restricted to each document of a packed row.

    Args:
        q: [1, h, S, Dh]; k, v: [1, h_kv, S, Dh] (h_kv divides h when ``enable_gqa``).
        cu_seqlens: [N + 1] integer offsets (0 = first, S = last).
        scale: softmax scale (1/sqrt(Dh)).
    Returns: [1, h, S, Dh].
    Raises: ValueError for a batch dimension other than 1, offsets not ending at S, or fewer
        key/value than query heads without ``enable_gqa``.
    """
    if q.shape[0] != 1:
        raise ValueError(f"packed attention needs batch 1 (documents along S), got {q.shape[0]}")
    if k.shape[1] != q.shape[1] and not enable_gqa:
        raise ValueError(f"{k.shape[1]} key/value heads for {q.shape[1]} query heads need "
                         f"enable_gqa=True")
    S = q.shape[2]
    offsets = [int(x) for x in cu_seqlens.tolist()]
    if offsets[0] != 0 or offsets[-1] != S:
        raise ValueError(f"cu_seqlens must run from 0 to {S}, got {offsets[0]}..{offsets[-1]}")
    varlen = (_torch_varlen_attn() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
              else None)
    if varlen is not None and dropout_p == 0.0:
        max_len = max(b - a for a, b in pairwise(offsets))
        return varlen_packed_attention(varlen, q, k, v, cu_seqlens, max_len, scale)
    out = torch.empty_like(q)
    for a, b in pairwise(offsets):
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
