"""Head-parallel context parallelism (all-to-all, "Ulysses") for both mixer kinds.

Letters: S full sequence, S_l = S / CP the rank's contiguous chunk, B micro-batch, C channels of a
fused projection (head-aligned segments), CP context-parallel size, r CP rank.

Each CP rank holds a contiguous chunk of the sequence. Around the sequence mixer (the gated delta
rule with its short conv, or attention) an all-to-all switches from sequence-sharding to
head-sharding: every rank receives the whole sequence for 1/CP of the heads, runs the exact
single-device mixer on it (recurrence, conv history, causal attention, packed documents all see
the full sequence), and a second all-to-all switches back. Exact against CP = 1 by construction;
needs CP x TP to divide the head counts (docs/model.md §7). Communication per layer: the mixer's inputs and
outputs once each way; no state is passed between ranks. Both collectives are autograd-aware
(``torch.distributed.nn``), so the backward runs the transposed all-to-alls.
"""
from __future__ import annotations

import warnings

import torch
from megatron.core import parallel_state

# torch marks the autograd-aware all_to_all_single of torch.distributed.nn as deprecated in
# favour of a private functional API; the public one is kept (it works on gloo and NCCL)
warnings.filterwarnings("ignore", message=r".*all_to_all_single is deprecated.*",
                        category=FutureWarning)


def cp_size() -> int:
    """The context-parallel world size (1 when not initialized)."""
    try:
        return parallel_state.get_context_parallel_world_size()
    except (AssertionError, RuntimeError):
        return 1


def _all_to_all(x: torch.Tensor) -> torch.Tensor:
    """All-to-all over the CP group along dim 0 of ``x`` [CP, ...] (autograd-aware)."""
    from torch.distributed.nn.functional import all_to_all_single

    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous, unlike empty_like
    return all_to_all_single(out, x, group=parallel_state.get_context_parallel_group())


def seq_to_heads(x: torch.Tensor, segments: list[int]) -> torch.Tensor:
    """[S_l, B, C] sequence chunk -> [S, B, C / CP] whole sequence, this rank's heads.

    Args:
        segments: channel sizes of the fused projection's head-aligned parts (each divisible by
            CP); rank r keeps the r-th contiguous 1/CP of every segment, in segment order.
    """
    cp = cp_size()
    S_l, B = x.shape[:2]
    parts = [p.reshape(S_l, B, cp, p.shape[-1] // cp) for p in torch.split(x, segments, dim=-1)]
    send = torch.cat(parts, dim=-1).permute(2, 0, 1, 3)  # [CP (destination), S_l, B, C/CP]
    recv = _all_to_all(send)                             # [CP (source chunk), S_l, B, C/CP]
    return recv.reshape(cp * S_l, B, -1)


def heads_to_seq(x: torch.Tensor) -> torch.Tensor:
    """[S, B, C_h] whole sequence, this rank's heads -> [S_l, B, CP * C_h] this rank's chunk,
    all heads (head groups in CP-rank order)."""
    cp = cp_size()
    S, B, C = x.shape
    send = x.reshape(cp, S // cp, B, C)                  # [CP (destination chunk), S_l, B, C_h]
    recv = _all_to_all(send)                             # [CP (source heads), S_l, B, C_h]
    return recv.permute(1, 2, 0, 3).reshape(S // cp, B, cp * C)
