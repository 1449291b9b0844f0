"""Weights, gradients and optimizer states per rank, as megatron-core 0.16 allocates them (exact).

``stage_parameters`` (``meta_model.py``: read from the model built on the meta device) lists one
pipeline stage's parameters on one TP rank in the order of the trainer's ``named_parameters()``.
``ddp_layout`` replays megatron-core's ``_ParamAndGradBuffer`` (``distributed/
param_and_grad_buffer.py``): parameters in reverse order; with the distributed optimizer every
parameter starts at a multiple of 64 elements and every bucket ends at a multiple of
lcm(DP, 128); buckets of ``max(4e7, 1e6 * DP)`` elements when ``--overlap-grad-reduce`` (none on
pipeline stages after the first); a tied embedding gets its own bucket.

``static_memory`` then gives a rank's bytes (all buffers allocated once, before training):

- params: the bf16 (or fp32) param buffer (distributed optimizer) or the parameter tensors;
- grads: the fp32 grad buffer (``grad_reduce_in_fp32``), padded like the param buffer;
- main params: fp32 copies of the rank's shard of each bf16 parameter (the distributed optimizer's
  ``shard_fp32_from_float16``; the full copies without it); none for fp32 parameters, whose
  shards are views of the param buffer;
- exp_avg, exp_avg_sq: torch AdamW's two fp32 states per main parameter element.

Without padding this is docs/model.md §10's N/(TP*PP) * (6 + 12/DP) bytes (bf16, distributed optimizer).

Context parallelism: CP ranks hold the same weights (CP splits the sequence and, inside the
mixers, the heads' work, not the parameters), so params and grads do not change with CP.
megatron-core 0.16's DDP builds its buffers over the data-parallel group *with* context
parallelism (``DistributedDataParallel`` passes ``intra_dp_cp_group`` to
``_ParamAndGradBuffer``; gradients are reduced over DP x CP), so bucket padding is
lcm(DP*CP, 128) and the distributed optimizer shards over DP*CP ranks (``DistributedOptimizer``
takes ``param_and_grad_buffer.data_parallel_group``): the optimizer share is that of
DP' = DP*CP. Only the default bucket size uses DP alone (``max(4e7, 1e6 * dp_group.size())``).
Formula: N/(TP*PP) * (6 + 12/(DP*CP)).
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.tuner.meta_model import (
    EMBEDDING,
    OUTPUT_LAYER,
    Param,
    cfg_key,
    shared_names,
    stage_parameters,
)

__all__ = ["BufferLayout", "Param", "StaticBytes", "ddp_layout", "default_bucket_size",
           "shard_numel", "stage_parameters", "static_memory", "worst_static_memory"]


@dataclass(frozen=True)
class BufferLayout:
    """One DDP param-and-grad buffer: total elements, buckets [(start, end)] and each parameter's
    [start, end) in the buffer (same order as the input list)."""

    numel: int
    buckets: tuple[tuple[int, int], ...]
    ranges: tuple[tuple[int, int], ...]


def _pad(n: int, divisor: int) -> int:
    return int(math.ceil(n / divisor) * divisor)


def ddp_layout(params: Sequence[Param], dp: int, distributed_optimizer: bool,
               bucket_size: int | None, shared: Sequence[str] = ()) -> BufferLayout:
    """Replay megatron-core 0.16's ``_ParamAndGradBuffer`` index computation.

    ``bucket_size``: elements per bucket or None (one bucket); ``shared``: names of parameters
    marked ``shared_embedding`` (tied embeddings under PP), which get their own bucket.
    """
    bucket_div = math.lcm(dp, 128)

    def pad_bucket(i: int) -> int:
        return _pad(i, bucket_div) if distributed_optimizer else i

    ranges = [None] * len(params)
    buckets = []
    start = bucket_start = 0
    in_bucket = 0
    end = 0
    for idx in range(len(params) - 1, -1, -1):
        name, numel = params[idx]
        if distributed_optimizer:
            start = _pad(start, 64)
        own = distributed_optimizer and name in shared
        if own and in_bucket:
            start = pad_bucket(start)
            buckets.append((bucket_start, start))
            bucket_start, in_bucket = start, 0
        end = start + numel
        ranges[idx] = (start, end)
        in_bucket += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or own:
            close = pad_bucket(end)
            buckets.append((bucket_start, close))
            bucket_start, in_bucket, start = close, 0, close
        else:
            start = end
    if in_bucket:
        close = pad_bucket(end)
        buckets.append((bucket_start, close))
    numel = buckets[-1][1] if buckets else 0
    return BufferLayout(numel, tuple(buckets), tuple(ranges))


def _covered(sorted_ranges: list[tuple[int, int]], starts: list[int], lo: int, hi: int) -> int:
    """Elements of [lo, hi) covered by the disjoint, sorted parameter ranges."""
    total = 0
    i = max(0, bisect.bisect_right(starts, lo) - 1)
    while i < len(sorted_ranges) and sorted_ranges[i][0] < hi:
        s, e = sorted_ranges[i]
        total += max(0, min(e, hi) - max(s, lo))
        i += 1
    return total


def shard_numel(layout: BufferLayout, dp: int, dp_rank: int,
                only: Sequence[int] | None = None) -> int:
    """Parameter elements (padding excluded) in data-parallel rank ``dp_rank``'s shard: the
    ``dp_rank``-th 1/DP of every bucket (megatron-core ``DistributedOptimizer``); ``only``:
    count the parameters of these indices only."""
    rs = sorted(layout.ranges if only is None else [layout.ranges[i] for i in only])
    starts = [s for s, _ in rs]
    total = 0
    for b0, b1 in layout.buckets:
        size = (b1 - b0) // dp
        total += _covered(rs, starts, b0 + dp_rank * size, b0 + (dp_rank + 1) * size)
    return total


@dataclass(frozen=True)
class StaticBytes:
    """Bytes of one rank's weights, gradients and optimizer states (allocated before training)."""

    params: int
    grads: int
    main_params: int
    exp_avg: int
    exp_avg_sq: int
    num_params: int          # parameter elements on this rank (no padding)
    optimizer_numel: int     # elements this rank's optimizer updates (its shard)
    num_buckets: int
    largest_group_numel: int = 0  # of optimizer_numel, the larger weight-decay group
    @property
    def total(self) -> int:
        """Sum of the five allocations, bytes."""
        return self.params + self.grads + self.main_params + self.exp_avg + self.exp_avg_sq


def default_bucket_size(dp: int, overlap_grad_reduce: bool, pp_rank: int,
                        ddp_bucket_size: int | None = None) -> int | None:
    """megatron-core DDP's bucket size: ``max(4e7, 1e6*DP)`` unless given (DP without CP: the
    ``dp_group``); None (one bucket) without ``--overlap-grad-reduce`` and on pipeline stages
    after the first."""
    if not overlap_grad_reduce or pp_rank > 0:
        return None
    return ddp_bucket_size if ddp_bucket_size is not None else max(40_000_000, 1_000_000 * dp)


_CACHE: dict = {}


def static_memory(cfg: OlmoHybridConfig, tp: int, stage_sizes: tuple[int, ...], pp_rank: int,
                  dp: int, dp_rank: int = 0, bf16: bool = True,
                  distributed_optimizer: bool = True, overlap_grad_reduce: bool = False,
                  ddp_bucket_size: int | None = None, cp: int = 1) -> StaticBytes:
    """Bytes that rank (tp, ``pp_rank``, ``dp_rank``) allocates for weights, gradients (fp32
    buffer) and AdamW (fp32 main params, exp_avg, exp_avg_sq). Exact for megatron-core 0.16.

    ``cp``: context-parallel size; the buffers and the optimizer shards are over the DP x CP
    group, and ``dp_rank`` is the rank in that group (0 .. DP*CP - 1).
    """
    key = (cfg_key(cfg), tp, tuple(stage_sizes), pp_rank, dp, dp_rank,
           bf16, distributed_optimizer, overlap_grad_reduce, ddp_bucket_size, cp)
    if key not in _CACHE:
        _CACHE[key] = _static_memory(cfg, tp, tuple(stage_sizes), pp_rank, dp, dp_rank, bf16,
                                     distributed_optimizer, overlap_grad_reduce, ddp_bucket_size,
                                     cp)
    return _CACHE[key]


def _static_memory(cfg, tp, stage_sizes, pp_rank, dp, dp_rank, bf16, distributed_optimizer,
                   overlap_grad_reduce, ddp_bucket_size, cp=1) -> StaticBytes:
    params = stage_parameters(cfg, tp, stage_sizes, pp_rank)
    n = sum(x for _, x in params)
    pbytes = 2 if bf16 else 4
    shared = shared_names(cfg, len(stage_sizes))
    bucket = default_bucket_size(dp, overlap_grad_reduce, pp_rank, ddp_bucket_size)
    dp_cp = dp * cp  # the buffers' data-parallel group includes CP (intra_dp_cp_group)
    layout = ddp_layout(params, dp_cp, distributed_optimizer, bucket, shared)
    # the Olmo weight-decay grouping: no decay on the input embedding (and a tied output layer)
    no_decay = [i for i, (name, _) in enumerate(params)
                if name == EMBEDDING or (shared and name == OUTPUT_LAYER)]
    if distributed_optimizer:
        shard = shard_numel(layout, dp_cp, dp_rank)
        nd = shard_numel(layout, dp_cp, dp_rank, no_decay) if no_decay else 0
        return StaticBytes(params=layout.numel * pbytes, grads=layout.numel * 4,
                           main_params=shard * 4 if bf16 else 0, exp_avg=shard * 4,
                           exp_avg_sq=shard * 4, num_params=n, optimizer_numel=shard,
                           num_buckets=len(layout.buckets), largest_group_numel=max(nd, shard - nd))
    nd = sum(params[i][1] for i in no_decay)
    return StaticBytes(params=n * pbytes, grads=layout.numel * 4, main_params=n * 4 if bf16 else 0,
                       exp_avg=n * 4, exp_avg_sq=n * 4, num_params=n, optimizer_numel=n,
                       num_buckets=len(layout.buckets), largest_group_numel=max(nd, n - nd))


def worst_static_memory(cfg: OlmoHybridConfig, tp: int, stage_sizes: tuple[int, ...],
                        pp_rank: int, dp: int, **kw) -> StaticBytes:
    """The data-parallel (x context-parallel, ``cp=`` in ``kw``) rank of stage ``pp_rank`` with
    the most static bytes (shards differ by the padding they contain)."""
    n = dp * kw.get("cp", 1)
    if not kw.get("distributed_optimizer", True) or n == 1:
        return static_memory(cfg, tp, stage_sizes, pp_rank, dp, 0, **kw)
    ranks = range(n) if n <= 16 else (0, n // 2, n - 1)
    return max((static_memory(cfg, tp, stage_sizes, pp_rank, dp, r, **kw) for r in ranks),
               key=lambda s: s.total)
