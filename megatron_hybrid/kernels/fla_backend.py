"""Thin wrappers over fla-core 0.6.0's Triton kernels (CUDA only; fla is imported lazily, on first use).

Letters used in shapes:
    B  batch; T tokens (packed length with ``cu_seqlens``, then B == 1); N sequences / documents
    H  key heads; HV value heads (multiple of H); K, V head dims
    C  conv channels; W conv width; D normalised dim

Bound fla functions (checked against the fla_core-0.6.0 wheel source; docs/model.md §11):
    fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
        output_final_state=False, use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
        allow_neg_eigval=False, state_v_first=False, cu_seqlens=None, ..., **kwargs[chunk_size])
        -> (o [B, T, HV, V] in q.dtype, final_state [N, HV, K, V] fp32 or None)
    fla.modules.causal_conv1d.causal_conv1d(x, weight=None, bias=None, residual=None,
        initial_state=None, output_final_state=False, activation=None, backend='triton',
        cu_seqlens=None, ...) -> (y [B, T, C] in x.dtype, final_state or None); weight [C, W] with
        tap W-1 = current token (same orientation as torch Conv1d's [C, 1, W]); activation
        'silu'/'swish' or None; computed in fp32, one rounding.
    fla.modules.norm.layernorm.rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False,
        residual_in_fp32=False) -> y = x * rstd(x) * w in fp32, one rounding to x.dtype.
    fla.modules.norm.fused_norm_gate.rms_norm_gated(x, g, weight, bias, activation='swish', residual=None,
        prenorm=False, residual_in_fp32=False, eps=1e-6) -> y = x * rstd(x) * w * g * sigmoid(g)
        in fp32, one rounding to x.dtype (norm of x first, then the swish gate of g).
All arguments after the leading tensors are passed by keyword.
"""

from __future__ import annotations

import torch

from .short_conv import normalize_conv_weight

__all__ = ["fla_available", "chunk_gated_delta_rule_fla", "short_conv_fla", "gated_rms_norm_fla", "rms_norm_fla"]

_FLA_OK: bool | None = None


def fla_available() -> bool:
    """True when fla's gated delta rule, causal conv and fused gated norm import (cached).

    Never raises; fla needs triton and a GPU driver, so this is False on CPU-only machines.
    """
    global _FLA_OK
    if _FLA_OK is None:
        try:
            import fla.modules.causal_conv1d  # noqa: F401
            import fla.modules.norm.fused_norm_gate  # noqa: F401
            import fla.ops.gated_delta_rule  # noqa: F401
            _FLA_OK = True
        except Exception:  # ImportError, or triton failing to find a driver at import
            _FLA_OK = False
    return _FLA_OK


def _require_cuda(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise RuntimeError(f"fla kernels need CUDA tensors; got a tensor on {t.device}. "
                               "Use the torch backend (MEGATRON_HYBRID_KERNELS=torch) on this device.")


def chunk_gated_delta_rule_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule via fla ``chunk_gated_delta_rule`` (both beta flags False: beta is used as given).

    Shapes and semantics as ``chunk_gated_delta_rule_torch`` (docs/model.md §4 step 6, §11):
    q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV] log decay (fp32, <= 0); beta [B, T, HV] in (0, 2);
    initial_state [N, HV, K, V] fp32; cu_seqlens LongTensor [N + 1] (B == 1).
    Returns (o [B, T, HV, V] in q.dtype, final_state [N, HV, K, V] fp32 or None).

    This wrapper does not apply the Hopper guard; the public ``gated_delta_rule`` does.

    Raises:
        RuntimeError: tensors not on CUDA, or fla's own errors (e.g. its Hopper guard in backward).
        ValueError: from fla, e.g. chunk_size not in (16, 32, 64), HV % H != 0, cu_seqlens with B != 1.
    """
    _require_cuda(q, k, v, g, beta, initial_state)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule(
        q, k, v, g, beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        use_beta_sigmoid_in_kernel=False,
        allow_neg_eigval=False,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )


def short_conv_fla(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    activation: str | None = "silu",
    cu_seqlens: torch.LongTensor | None = None,
) -> torch.Tensor:
    """Causal depthwise conv via fla ``causal_conv1d`` (Triton backend), no bias, no state.

    x [B, T, C]; weight [C, W] or [C, 1, W] (tap W-1 = current token); activation "silu"/"swish"/None;
    cu_seqlens [N + 1] resets the history at each document (B == 1). Returns y [B, T, C] in x.dtype.
    Formula: docs/model.md §4 step 2.

    Raises:
        RuntimeError: tensors not on CUDA. ValueError: bad weight shape or activation.
    """
    _require_cuda(x, weight)
    if activation not in (None, "silu", "swish", "identity"):
        raise ValueError(f"activation must be 'silu', 'swish', 'identity' or None; got {activation!r}")
    from fla.modules.causal_conv1d import causal_conv1d

    w = normalize_conv_weight(weight, x.shape[-1])
    y, _ = causal_conv1d(
        x,
        weight=w,
        bias=None,
        residual=None,
        initial_state=None,
        output_final_state=False,
        activation=None if activation == "identity" else activation,
        backend="triton",
        cu_seqlens=cu_seqlens,
    )
    return y


def gated_rms_norm_fla(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Gated RMSNorm via fla ``rms_norm_gated`` (FusedRMSNormGated): x * rsqrt(mean(x^2)+eps) * w * silu(z).

    x, z [..., D]; weight [D]. fp32 math, one rounding to x.dtype. docs/model.md §4 step 7.

    Raises:
        RuntimeError: tensors not on CUDA.
    """
    _require_cuda(x, z, weight)
    from fla.modules.norm.fused_norm_gate import rms_norm_gated

    return rms_norm_gated(x, z, weight, None, activation="swish", eps=eps)


def rms_norm_fla(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm via fla's fused Triton kernel: x * rsqrt(mean(x^2) + eps) * w (docs/model.md §2).

    x [..., D]; weight [D]. fp32 math, one rounding to x.dtype. Returns [..., D].

    Raises:
        RuntimeError: tensors not on CUDA. ValueError: weight is not [D].
    """
    _require_cuda(x, weight)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must be [D] = [{x.shape[-1]}]; got {tuple(weight.shape)}")
    from fla.modules.norm.layernorm import rms_norm

    return rms_norm(x, weight, None, eps=eps)
