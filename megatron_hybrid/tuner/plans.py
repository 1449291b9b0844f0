"""Candidate parallel layouts (plans) and the constraints that refuse them.

A plan fixes TP, PP (with the layers of each stage), DP, CP, the micro-batch size, the recompute
granularity and the distributed optimizer; sequence parallelism is on whenever TP > 1, as the
launch scripts do. Constraints are the trainer's own (``OlmoHybridConfig.validate_parallel`` for
TP / PP, ``training.arguments.validate_args`` for batch sizes and CP) plus one of the tuner's:
TP stays within a node (its all-gathers run on every layer).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from megatron_hybrid.config import ConfigError, OlmoHybridConfig
from megatron_hybrid.layers.layout import HybridLayout

RECOMPUTE = ("none", "selective", "full")
CP_UNSUPPORTED = ("--context-parallel-size > 1 is not modelled by the tuner yet (the trainer "
                  "runs head-parallel CP, where CP x TP must divide the heads)")


@dataclass(frozen=True)
class Job:
    """What is fixed by the user: the cluster, the sequence and batch, the precision.

    ``num_gpus``, ``gpus_per_node``: GPUs; ``seq_length`` tokens per sequence;
    ``global_batch_size`` sequences per iteration; ``bf16``: bf16 params and compute (fp32 main
    weights and gradients), else fp32; ``z_loss``: the z-loss term is on (``--z-loss-weight`` > 0);
    ``overlap_grad_reduce`` / ``overlap_param_gather`` / ``ddp_bucket_size``: DDP settings.
    """

    num_gpus: int
    seq_length: int
    global_batch_size: int
    gpus_per_node: int = 8
    bf16: bool = True
    z_loss: bool = True
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    ddp_bucket_size: Optional[int] = None


@dataclass(frozen=True)
class Plan:
    """One layout. ``stage_sizes``: layers per pipeline stage; ``num_microbatches`` per
    data-parallel rank per iteration."""

    tp: int
    pp: int
    dp: int
    cp: int
    mbs: int
    num_microbatches: int
    recompute: str
    distributed_optimizer: bool
    stage_sizes: Tuple[int, ...]

    @property
    def sequence_parallel(self) -> bool:
        """On whenever TP > 1 (the launch scripts pass --sequence-parallel then)."""
        return self.tp > 1

    @property
    def uneven(self) -> bool:
        """Stages hold different numbers of layers (needs '|' in --hybrid-layer-pattern)."""
        return len(set(self.stage_sizes)) > 1

    def pattern(self, cfg: OlmoHybridConfig) -> str:
        """The layout string with '|' at this plan's stage boundaries."""
        return HybridLayout(cfg.layout.layer_types, tuple(self.stage_sizes)).pattern()

    def label(self) -> str:
        """Short text, e.g. ``TP2 PP2[15/17] DP16 mbs1 selective``."""
        pp = f"PP{self.pp}" + (f"[{'/'.join(map(str, self.stage_sizes))}]" if self.uneven else "")
        cp = f" CP{self.cp}" if self.cp > 1 else ""
        do = "" if self.distributed_optimizer else " no-distopt"
        return f"TP{self.tp} {pp} DP{self.dp}{cp} mbs{self.mbs} {self.recompute}{do}"


@dataclass(frozen=True)
class Pins:
    """Dimensions the user fixed (None: searched)."""

    tp: Optional[int] = None
    pp: Optional[int] = None
    cp: Optional[int] = None
    mbs: Optional[int] = None
    recompute: Optional[str] = None
    distributed_optimizer: Optional[bool] = None
    max_mbs: int = 16


def divisors(n: int) -> List[int]:
    """Positive divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_explanation(cfg: OlmoHybridConfig, limit: int = 8) -> str:
    """Which TP values (up to ``limit``) each size allows, e.g. ``30 (heads ...): 1, 2, 3, 5, 6;
    11008 (--ffn-hidden-size): 1, 2, 4, 8``."""
    by_size = {}
    for name, n in cfg.tp_divisibility().items():
        by_size.setdefault(n, []).append(name)
    parts = [f"{'/'.join(names)} = {n} allows TP " + ", ".join(
        str(t) for t in range(1, limit + 1) if n % t == 0) for n, names in by_size.items()]
    return "; ".join(parts)


def refusal(cfg: OlmoHybridConfig, plan: Plan, job: Job) -> Optional[str]:
    """Why the trainer (or the tuner) refuses ``plan``, or None. One line, naming the flags."""
    if plan.cp > 1:
        return CP_UNSUPPORTED
    try:
        cfg.validate_parallel(plan.tp, 1)
    except ConfigError as err:
        return f"{err} ({tp_explanation(cfg, max(8, plan.tp))})"
    if plan.tp > job.gpus_per_node:
        return (f"--tensor-model-parallel-size {plan.tp} spans nodes ({job.gpus_per_node} GPUs "
                f"per node); TP communicates on every layer and must stay on NVLink")
    mp = plan.tp * plan.pp * plan.cp
    if job.num_gpus % mp:
        return (f"{job.num_gpus} GPUs are not divisible by TP {plan.tp} x PP {plan.pp} x "
                f"CP {plan.cp}")
    if plan.pp > cfg.num_layers:
        return (f"--pipeline-model-parallel-size {plan.pp} must be in [1, {cfg.num_layers}] "
                f"(--num-layers)")
    stages = cfg.layout.stage_sizes
    if stages is not None and tuple(stages) != tuple(plan.stage_sizes):
        return (f"--hybrid-layer-pattern fixes the stages {list(stages)}; the plan has "
                f"{list(plan.stage_sizes)}")
    if sum(plan.stage_sizes) != cfg.num_layers or len(plan.stage_sizes) != plan.pp:
        return (f"stage sizes {list(plan.stage_sizes)} do not split {cfg.num_layers} layers in "
                f"{plan.pp} stages")
    if job.global_batch_size % (plan.mbs * plan.dp):
        return (f"--global-batch-size {job.global_batch_size} is not divisible by "
                f"--micro-batch-size {plan.mbs} x data-parallel size {plan.dp}")
    if plan.sequence_parallel and job.seq_length % plan.tp:
        return (f"--sequence-parallel: --seq-length {job.seq_length} must be divisible by "
                f"--tensor-model-parallel-size {plan.tp}")
    return None


def min_max_partition(num_layers: int, parts: int,
                      cost: Callable[[int, int, int], float]) -> Tuple[int, ...]:
    """Contiguous split of ``num_layers`` layers into ``parts`` non-empty stages minimising the
    largest ``cost(stage_index, first_layer, end_layer)`` (dynamic programming)."""
    INF = float("inf")
    best = [[INF] * (num_layers + 1) for _ in range(parts + 1)]
    arg = [[0] * (num_layers + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for i in range(1, parts + 1):
        lo, hi = i, num_layers - (parts - i)
        for e in range(lo, hi + 1):
            for s in range(i - 1, e):
                if best[i - 1][s] == INF:
                    continue
                c = max(best[i - 1][s], cost(i - 1, s, e))
                if c < best[i][e]:
                    best[i][e], arg[i][e] = c, s
    sizes, e = [], num_layers
    for i in range(parts, 0, -1):
        s = arg[i][e]
        sizes.append(e - s)
        e = s
    return tuple(reversed(sizes))


def even_split(num_layers: int, pp: int) -> Optional[Tuple[int, ...]]:
    """megatron-core's even split, or None when PP does not divide the layers."""
    return (num_layers // pp,) * pp if num_layers % pp == 0 else None


def _tp_allowed(cfg: OlmoHybridConfig, tp: int) -> bool:
    try:
        cfg.validate_parallel(tp, 1)
        return True
    except ConfigError:
        return False


def candidate_grid(cfg: OlmoHybridConfig, job: Job, pins: Pins) -> Iterator[Plan]:
    """Every (TP, PP, CP, mbs, recompute, distributed optimizer) combination to consider, each
    with the pattern's '|' stages, else the even split, else ``()`` (to be balanced).

    A TP the model refuses, a CP > 1 or a layout that does not divide the GPUs is yielded once
    per (TP, PP) (other dimensions at their first value), so that the report names the reason.
    """
    cp = pins.cp or 1
    tps = [pins.tp] if pins.tp else [t for t in divisors(job.num_gpus) if t <= job.gpus_per_node]
    recomputes = [pins.recompute] if pins.recompute else list(RECOMPUTE)
    dos = ([pins.distributed_optimizer] if pins.distributed_optimizer is not None
           else [True, False])
    fixed = cfg.layout.stage_sizes
    gbs = job.global_batch_size
    for tp in tps:
        tp_ok = _tp_allowed(cfg, tp)
        if fixed is not None:
            pps = [len(fixed)]
        elif pins.pp:
            pps = [pins.pp]
        else:
            pps = [d for d in divisors(max(job.num_gpus // (tp * cp), 1)) if d <= cfg.num_layers]
        for pp in pps:
            mp = tp * pp * cp
            dp = job.num_gpus // mp if job.num_gpus % mp == 0 else 0
            split = tuple(fixed) if fixed else (even_split(cfg.num_layers, pp) or ())
            if not tp_ok or dp == 0 or cp > 1 or pp > cfg.num_layers:
                yield Plan(tp, pp, dp, cp, pins.mbs or 1, 0, recomputes[0], dos[0],
                           split or (cfg.num_layers,))
                if not tp_ok:
                    break
                continue
            per_dp = gbs // dp if gbs % dp == 0 else 0
            mbss = [pins.mbs] if pins.mbs else (
                [m for m in divisors(per_dp) if m <= pins.max_mbs] or [1])
            for mbs in mbss:
                m = gbs // (mbs * dp) if gbs % (mbs * dp) == 0 else 0
                for rc in recomputes:
                    for do in dos:
                        yield Plan(tp, pp, dp, cp, mbs, m, rc, do, split)


def with_split(plan: Plan, sizes: Sequence[int]) -> Plan:
    """``plan`` with other stage sizes."""
    return replace(plan, stage_sizes=tuple(sizes))
