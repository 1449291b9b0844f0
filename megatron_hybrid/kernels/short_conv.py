"""Causal depthwise short convolution (the GDN q/k/v convs) in pure PyTorch.

Letters used in shapes:
    B  batch size; T tokens (packed length with ``cu_seqlens``, then B == 1)
    C  channels; W kernel width (4 for Olmo Hybrid); N documents ([N + 1] offsets in ``cu_seqlens``)

Formula (docs/model.md §4 step 2; PyTorch Conv1d orientation, tap W-1 is the current token, no flip):
    y[t, c] = act( sum_{j=0..W-1} w[c, j] * x[t - W + 1 + j, c] ),  x = 0 before the sequence start
and, with ``cu_seqlens``, before every document start (zero conv history per document).
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

__all__ = ["short_conv_torch", "normalize_conv_weight"]

_ACTIVATIONS = (None, "silu", "swish", "identity")


def normalize_conv_weight(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Return the depthwise conv weight as [C, W] (a view when possible).

    Args:
        weight: [C, W] (fla / Dao causal_conv1d layout) or [C, 1, W] (torch Conv1d layout).
        channels: expected C.

    Raises:
        ValueError: if the weight is not [C, W] or [C, 1, W] with C == ``channels``.
    """
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"conv weight must be [C, W] or [C, 1, W] with C={channels}; got {tuple(weight.shape)}")
    return weight


def _check_activation(activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}; got {activation!r}")


def short_conv_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    activation: str | None = "silu",
    cu_seqlens: torch.LongTensor | None = None,
) -> torch.Tensor:
    """Causal depthwise 1-D convolution with optional SiLU, via ``F.conv1d(groups=C)``.

    Computed in fp32 (fp64 if x is fp64) with one rounding to x.dtype at the end (as fla's kernel).

    Args:
        x: [B, T, C] input.
        weight: [C, W] or [C, 1, W]; tap W-1 multiplies the current token.
        activation: "silu" / "swish" (same), or None / "identity" for no activation.
        cu_seqlens: LongTensor [N + 1] document offsets (B must be 1); history is zero before each
            document start. Implemented by inserting W-1 zero rows before every document, one conv
            over the whole gapped sequence, and a gather (exact, no loop over documents).

    Returns:
        y: [B, T, C] in x.dtype.

    Raises:
        ValueError: wrong shapes, unknown activation, cu_seqlens with B != 1 or not ending at T.
    """
    _check_activation(activation)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, C]; got {tuple(x.shape)}")
    B, T, C = x.shape
    w = normalize_conv_weight(weight, C)
    W = w.shape[1]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = w.to(cdt).unsqueeze(1)  # [C, 1, W]
    xc = x.to(cdt)
    if cu_seqlens is None:
        y = F.conv1d(F.pad(xc.transpose(1, 2), (W - 1, 0)), w, groups=C).transpose(1, 2)
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens requires batch size 1; got B={B}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in pairwise(cu)):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={T}; got {cu}")
        lengths = torch.tensor([b - a for a, b in pairwise(cu)], device=x.device)
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)  # [T]
        dst = torch.arange(T, device=x.device) + (doc + 1) * (W - 1)  # position in the gapped sequence
        Lp = T + len(lengths) * (W - 1)
        xp = xc.new_zeros(1, Lp, C).index_copy(1, dst, xc)
        yp = F.conv1d(xp.transpose(1, 2), w, groups=C).transpose(1, 2)  # output j <-> input j + W - 1
        y = yp.index_select(1, dst - (W - 1))
    if activation in ("silu", "swish"):
        y = F.silu(y)
    return y.to(x.dtype)
