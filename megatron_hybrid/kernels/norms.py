"""Normalisations used by Olmo Hybrid, in pure PyTorch (fp32 math, one rounding at the end).

Letters used in shapes:
    D  normalised (last) dimension; ``...`` any leading dims

Formulas (docs/model.md §2 "RMSNorm", §4 steps 3 and 7):
    l2_norm:        x * rsqrt(sum(x^2) + eps)                      (fla l2norm, eps 1e-6)
    rms_norm:       x * rsqrt(mean(x^2) + eps) * w                 (eps 1e-6 for the model norms)
    gated_rms_norm: x * rsqrt(mean(x^2) + eps) * w * silu(z)       (fla FusedRMSNormGated, eps 1e-5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["l2_norm", "rms_norm_torch", "gated_rms_norm_torch"]


def _cdt(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def l2_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the last dim: x * rsqrt(sum(x^2) + eps), computed in fp32, cast back to x.dtype.

    Args:
        x: [..., D].
        eps: added to the sum of squares (fla's in-kernel l2norm uses 1e-6).

    Returns:
        [..., D] in x.dtype.
    """
    xf = x.to(_cdt(x))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm: x * rsqrt(mean(x^2) + eps) * w, in fp32, cast back to x.dtype (docs/model.md §2).

    Args:
        x: [..., D].
        weight: [D] (no (1 + w) form, no bias).
        eps: variance epsilon (1e-6 for all Olmo Hybrid model norms).

    Returns:
        [..., D] in x.dtype.

    Raises:
        ValueError: if weight is not [D].
    """
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must be [D] = [{x.shape[-1]}]; got {tuple(weight.shape)}")
    dt = _cdt(x, weight)
    xf = x.to(dt)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dt)
    return y.to(x.dtype)


def gated_rms_norm_torch(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Gated RMSNorm, norm then gate: x * rsqrt(mean(x^2) + eps) * w * silu(z).

    All in fp32 with one rounding to x.dtype at the end, as fla ``FusedRMSNormGated`` /
    ``rms_norm_gated(..., activation="swish")`` (docs/model.md §4 step 7). HF's torch path rounds
    before multiplying by w: same math, not bitwise.

    Args:
        x: [..., D] values to normalise (the GDN output viewed per head, D = Dv).
        z: [..., D] gate (same shape as x).
        weight: [D], shared by all heads.
        eps: variance epsilon (1e-5 for the GDN output norm).

    Returns:
        [..., D] in x.dtype.

    Raises:
        ValueError: if z's shape differs from x's or weight is not [D].
    """
    if z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}; got {tuple(z.shape)}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must be [D] = [{x.shape[-1]}]; got {tuple(weight.shape)}")
    dt = _cdt(x, z, weight)
    xf, zf = x.to(dt), z.to(dt)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dt) * F.silu(zf)
    return y.to(x.dtype)
