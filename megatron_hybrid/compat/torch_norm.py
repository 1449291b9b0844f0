"""Patch #4 of docs/megatron_core_notes.md §2: sequence parallelism with megatron's `WrappedTorchNorm`.

`transformer/torch_norm.py:32` asserts `not config.sequence_parallel` unconditionally, so the local
spec (`get_gpt_layer_local_spec`, used whenever Transformer Engine/apex are missing, GPU included)
cannot run with `--sequence-parallel`. The replacement `__new__` builds the same torch module
(`torch.nn.LayerNorm` / `torch.nn.RMSNorm` per `config.normalization`) and tags its parameters with
`sequence_parallel = config.sequence_parallel`, so `finalize_model_grads` sums their gradients over
the TP group. Applied on every device.
"""
from __future__ import annotations

import threading

import torch

_LOCK = threading.Lock()
_ORIG_NEW = None


def _wrapped_torch_norm_new(
    cls,
    config,
    hidden_size: int,
    eps: float = 1e-5,
    persist_layer_norm: bool = False,
    zero_centered_gamma: bool = False,
    normalization: str = "LayerNorm",
):
    """Build the torch norm for `config.normalization`, SP-aware (`WrappedTorchNorm.__new__`).

    Raises ValueError for options torch norms do not support (zero-centered gamma, persistent or
    memory-efficient layer norm) and for an unknown `config.normalization`.
    Source: docs/megatron_core_notes.md §2 #4.
    """
    if config.layernorm_zero_centered_gamma:
        raise ValueError("zero_centered_gamma not supported by torch LayerNorm")
    if config.persist_layer_norm:
        raise ValueError("persist_layer_norm not supported by torch LayerNorm")
    if getattr(config, "memory_efficient_layer_norm", False):
        raise ValueError("memory_efficient_layer_norm not supported by torch LayerNorm")
    kind = config.normalization
    if kind == "LayerNorm":
        norm = torch.nn.LayerNorm(normalized_shape=hidden_size, eps=eps)
    elif kind == "RMSNorm":
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
    elif kind == "L2Norm":
        from megatron.core.transformer.torch_norm import L2Norm

        norm = L2Norm(hidden_size=hidden_size, eps=eps)
    else:
        raise ValueError(
            f"normalization {kind!r}: only LayerNorm, RMSNorm and L2Norm are supported"
        )
    for param in norm.parameters():
        param.sequence_parallel = bool(config.sequence_parallel)
    return norm


def apply() -> bool:
    """Replace `megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__` (idempotent).

    Returns True when active. Source: docs/megatron_core_notes.md §2 #4.
    """
    global _ORIG_NEW
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    with _LOCK:
        current = WrappedTorchNorm.__dict__.get("__new__")
        current = getattr(current, "__func__", current)
        if current is not _wrapped_torch_norm_new:
            _ORIG_NEW = current
            WrappedTorchNorm.__new__ = staticmethod(_wrapped_torch_norm_new)
    return is_applied()


def is_applied() -> bool:
    """True when `WrappedTorchNorm.__new__` is the sequence-parallel-aware replacement."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    current = WrappedTorchNorm.__dict__.get("__new__")
    return getattr(current, "__func__", current) is _wrapped_torch_norm_new
