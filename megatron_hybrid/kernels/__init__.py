"""megatron_hybrid.kernels: device-agnostic entry points for the Olmo Hybrid GDN math.

Letters used in shapes:
    B batch; T tokens (packed length with ``cu_seqlens``, then B == 1); N sequences / documents
    H key heads; HV value heads (multiple of H); K, V head dims; C conv channels; W conv width;
    D normalised dim

Each op has two implementations (docs/design.md §3): fla's Triton kernels on CUDA when fla imports, else
pure PyTorch (``gated_delta_rule_torch``, ``short_conv``, ``norms``). Selection: an explicit
``backend=`` argument wins; otherwise the environment variable ``MEGATRON_HYBRID_KERNELS=torch|fla``;
otherwise "fla" for CUDA tensors when fla imports, "torch" elsewhere. This package never imports
megatron-core, and imports fla only when an fla path is used.
"""

from __future__ import annotations

import os

import torch

from .gated_delta_rule_torch import chunk_gated_delta_rule_torch
from .norms import gated_rms_norm_torch, l2_norm, rms_norm_torch
from .short_conv import short_conv_torch

__all__ = [
    "ENV_BACKEND", "select_backend", "gated_delta_rule", "short_conv", "gated_rms_norm", "l2_norm", "rms_norm",
    "chunk_gated_delta_rule_torch", "short_conv_torch", "gated_rms_norm_torch", "rms_norm_torch",
    "resolve_backend",
]

ENV_BACKEND = "MEGATRON_HYBRID_KERNELS"
_BACKENDS = ("torch", "fla")


def _fla_available() -> bool:
    from .fla_backend import fla_available

    return fla_available()


def _device_of(device) -> torch.device:
    if isinstance(device, torch.Tensor):
        return device.device
    return torch.device(device)


def select_backend(device) -> str:
    """Pick the kernel backend for tensors on ``device``: "fla" or "torch".

    Args:
        device: a torch.device, a device string ("cuda:0", "cpu") or a tensor (its device is used).

    Returns:
        ``MEGATRON_HYBRID_KERNELS`` if set ("torch" or "fla"); else "fla" when the device is CUDA and fla
        imports; else "torch".

    Raises:
        ValueError: the environment variable holds something other than torch / fla.
        RuntimeError: "fla" forced for a non-CUDA device, or forced while fla does not import.
    """
    dev = _device_of(device)
    forced = os.environ.get(ENV_BACKEND, "").strip().lower()
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"{ENV_BACKEND} must be one of {_BACKENDS}; got {forced!r}")
        if forced == "fla":
            _check_fla_usable(dev)
        return forced
    return "fla" if dev.type == "cuda" and _fla_available() else "torch"


def _check_fla_usable(dev: torch.device) -> None:
    if dev.type != "cuda":
        raise RuntimeError(f"fla kernels need CUDA tensors, got {dev}; use the torch backend "
                           f"(unset {ENV_BACKEND} or set it to torch)")
    if not _fla_available():
        raise RuntimeError("fla backend requested but fla does not import: install fla-core==0.6.0 "
                           "(extra [gpu]) with a working triton, or use the torch backend")


def resolve_backend(backend: str | None, device) -> str:
    """The implementation an op called with ``backend=`` on ``device`` runs: "torch" or "fla".

    Raises:
        ValueError: ``backend`` is not None, "torch" or "fla".
        RuntimeError: "fla" forced on a non-CUDA device or without fla.
    """
    if backend is None:
        return select_backend(device)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be None, 'torch' or 'fla'; got {backend!r}")
    if backend == "fla":
        _check_fla_usable(_device_of(device))
    return backend


def gated_delta_rule(
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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule (docs/model.md §4 step 6): S_t = e^{g_t}(I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,
    o_t = S_t^T (scale q_t), state [K, V] in fp32; chunked (WY) form on either backend.

    Args:
        q, k: [B, T, H, K]. v: [B, T, HV, V], HV a multiple of H (value head j reads key head j // (HV/H)).
        g: [B, T, HV] natural-log decay (<= 0), fp32. beta: [B, T, HV] in (0, 2), used as given.
        scale: default K ** -0.5. initial_state: [N, HV, K, V] fp32 or None (zeros).
        output_final_state: return the final state [N, HV, K, V] fp32.
        cu_seqlens: LongTensor [N + 1] packed-document offsets (B == 1); each document starts from its
            own initial_state row.
        use_qk_l2norm_in_kernel: L2-normalise q, k per head (x * rsqrt(sum x^2 + 1e-6), fp32).
        chunk_size: 64 (fla accepts 16, 32, 64; torch any positive int).
        backend: None (auto, see ``select_backend``), "torch" or "fla".

    Returns:
        (o [B, T, HV, V] in q.dtype, final_state [N, HV, K, V] fp32 or None).

    fla 0.6.0 refuses the gated chunk backward on some Hoppers (``runtime/hopper_guard.py``); this
    function does not apply that policy: callers that train (the GDN layer, the benchmark) consult
    ``megatron_hybrid.runtime.hopper_guard`` before the forward, so the refusal comes first. A
    direct caller that trains on a Hopper calls
    ``runtime.hopper_guard.ensure_fla_gdn_backward_allowed(K, V, dtype, device, H=.., HV=..)`` first.

    Raises:
        ValueError: bad shapes / arguments (see ``chunk_gated_delta_rule_torch`` and fla).
        RuntimeError: fla forced on a non-CUDA device or without fla.
    """
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, chunk_size=chunk_size)
    if resolve_backend(backend, q) == "torch":
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, **kwargs)
    from .fla_backend import chunk_gated_delta_rule_fla

    return chunk_gated_delta_rule_fla(q, k, v, g, beta, **kwargs)


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    activation: str | None = "silu",
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal depthwise short conv (docs/model.md §4 step 2): y[t,c] = act(sum_j w[c,j] x[t-W+1+j, c]).

    Args:
        x: [B, T, C]. weight: [C, W] or [C, 1, W] (torch Conv1d orientation: tap W-1 = current token).
        activation: "silu"/"swish" or None. cu_seqlens: [N + 1] (B == 1), zero history per document.
        backend: None (auto), "torch" or "fla".

    Returns:
        y [B, T, C] in x.dtype (fp32 math, one rounding).

    Raises:
        ValueError: bad shapes / activation. RuntimeError: fla forced where it cannot run.
    """
    if resolve_backend(backend, x) == "torch":
        return short_conv_torch(x, weight, activation=activation, cu_seqlens=cu_seqlens)
    from .fla_backend import short_conv_fla

    return short_conv_fla(x, weight, activation=activation, cu_seqlens=cu_seqlens)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *,
                   backend: str | None = None) -> torch.Tensor:
    """Gated RMSNorm, norm then gate (docs/model.md §4 step 7): x * rsqrt(mean(x^2) + eps) * w * silu(z).

    Args:
        x, z: [..., D]. weight: [D]. eps: 1e-5 for the GDN output norm.
        backend: None (auto), "torch" or "fla".

    Returns:
        [..., D] in x.dtype (fp32 math, one rounding; fla FusedRMSNormGated semantics).

    Raises:
        ValueError: shape mismatch (torch path). RuntimeError: fla forced where it cannot run.
    """
    if resolve_backend(backend, x) == "torch":
        return gated_rms_norm_torch(x, z, weight, eps=eps)
    from .fla_backend import gated_rms_norm_fla

    return gated_rms_norm_fla(x, z, weight, eps=eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             backend: str | None = None) -> torch.Tensor:
    """RMSNorm (docs/model.md §2): x * rsqrt(mean(x^2) + eps) * w, fp32 math, one rounding.

    Args:
        x: [..., D]. weight: [D]. eps: 1e-6 for the model norms.
        backend: None (auto), "torch" or "fla" (fla's fused Triton RMSNorm: one kernel forward,
            one backward, instead of about ten elementwise passes over fp32 copies).

    Returns:
        [..., D] in x.dtype.

    Raises:
        ValueError: weight is not [D] (torch path). RuntimeError: fla forced where it cannot run.
    """
    if resolve_backend(backend, x) == "torch":
        return rms_norm_torch(x, weight, eps)
    from .fla_backend import rms_norm_fla

    return rms_norm_fla(x, weight, eps=eps)
