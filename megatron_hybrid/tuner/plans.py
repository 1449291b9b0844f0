"""Candidate parallel layouts (plans) and the constraints that refuse them.

A plan fixes TP, PP (with the layers of each stage), DP, CP, the micro-batch size, the recompute
granularity and the distributed optimizer; sequence parallelism is on whenever TP > 1, as the
launch scripts do. World size = TP x PP x CP x DP. Constraints are the trainer's own
(``OlmoHybridConfig.validate_parallel`` for TP / PP and CP x TP against the heads,
``config.arguments.validate_args`` for batch sizes and ``--seq-length`` against CP and TP x CP)
plus one of the tuner's: TP stays within a node (its all-gathers run on every layer).

Context parallelism (head-parallel "Ulysses", ``layers/context_parallel.py``): a pinned
``--context-parallel-size`` is the only CP tried; otherwise ``cp_candidates`` adds every power
of two > 1 that divides the GPUs and the sequence, for sequences of ``CP_MIN_SEQ_LENGTH`` tokens
or more, and for shorter ones only when no CP = 1 plan fits (``search.search`` then runs a second
pass). Below that length CP would trade the activations of a sequence that already fits for four
all-to-alls on every layer.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from megatron_hybrid.config import ConfigError, OlmoHybridConfig
from megatron_hybrid.config.layout import HybridLayout

RECOMPUTE = ("none", "selective", "full")
#: sequences at least this long (tokens) search CP > 1 by default; shorter ones only when no CP = 1
#: plan fits (or when --context-parallel-size is pinned)
CP_MIN_SEQ_LENGTH = 16384


_LAYOUTS: dict[tuple[str, int], HybridLayout] = {}


def parsed_layout(cfg: OlmoHybridConfig) -> HybridLayout:
    """``cfg.layout``, parsed once per (pattern, layers): the property parses the pattern on every
    read and a search reads it tens of thousands of times."""
    key = (cfg.hybrid_layer_pattern, cfg.num_layers)
    hit = _LAYOUTS.get(key)
    if hit is None:
        hit = _LAYOUTS[key] = cfg.layout
    return hit


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
    ddp_bucket_size: int | None = None


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
    stage_sizes: tuple[int, ...]

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
        return HybridLayout(parsed_layout(cfg).layer_types, tuple(self.stage_sizes)).pattern()

    @property
    def dp_cp(self) -> int:
        """Ranks that gradients are reduced over and the distributed optimizer shards over:
        DP x CP (megatron-core's data-parallel group with context parallelism)."""
        return self.dp * self.cp

    def local_tokens(self, seq_length: int) -> int:
        """Tokens of one micro-batch on one rank: mbs x S / CP (each CP rank holds a contiguous
        S / CP chunk outside the sequence mixers)."""
        return self.mbs * seq_length // self.cp

    def label(self) -> str:
        """Short text, e.g. ``TP2 PP2[15/17] DP16 CP2 mbs1 selective``."""
        pp = f"PP{self.pp}" + (f"[{'/'.join(map(str, self.stage_sizes))}]" if self.uneven else "")
        cp = f" CP{self.cp}" if self.cp > 1 else ""
        do = "" if self.distributed_optimizer else " no-distopt"
        return f"TP{self.tp} {pp} DP{self.dp}{cp} mbs{self.mbs} {self.recompute}{do}"


@dataclass(frozen=True)
class Pins:
    """Dimensions the user fixed (None: searched)."""

    tp: int | None = None
    pp: int | None = None
    cp: int | None = None
    mbs: int | None = None
    recompute: str | None = None
    distributed_optimizer: bool | None = None
    max_mbs: int = 16


def divisors(n: int) -> list[int]:
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


def cp_explanation(cfg: OlmoHybridConfig, tp: int, seq_length: int, num_gpus: int) -> str:
    """The CP values this job can use at TP ``tp``: CP x TP divides every head count
    (``config.validate_parallel``), CP divides the sequence (TP x CP with sequence parallelism)
    and TP x CP divides the GPUs; e.g. ``usable here: CP 1, 2``."""
    heads = [cfg.num_attention_heads, cfg.num_query_groups, cfg.linear_num_key_heads,
             cfg.linear_num_value_heads]
    ok = [c for c in range(1, num_gpus // tp + 1)
          if all(n % (c * tp) == 0 for n in heads) and seq_length % (c * tp) == 0
          and num_gpus % (c * tp) == 0]
    return f"usable with {num_gpus} GPUs at sequence {seq_length}: CP " + ", ".join(map(str, ok))


def cp_refusal(cfg: OlmoHybridConfig, tp: int, cp: int, seq_length: int,
               num_gpus: int | None = None) -> str | None:
    """Why the trainer refuses CP at this TP and sequence length (its messages), or None.
    Assumes TP itself is allowed. With ``num_gpus``, a head refusal adds the CP values the job
    can use."""
    if cp == 1:
        return None
    try:
        cfg.validate_parallel(tp, 1, cp)
    except ConfigError as err:
        return f"{err}; {cp_explanation(cfg, tp, seq_length, num_gpus)}" if num_gpus else str(err)
    if seq_length % cp:
        return f"--seq-length {seq_length} must be divisible by --context-parallel-size {cp}"
    if tp > 1 and seq_length % (tp * cp):
        return (f"--sequence-parallel: --seq-length {seq_length} must be divisible by "
                f"--tensor-model-parallel-size {tp} x --context-parallel-size {cp}")
    return None


def refusal(cfg: OlmoHybridConfig, plan: Plan, job: Job) -> str | None:
    """Why the trainer (or the tuner) refuses ``plan``, or None. One line, naming the flags."""
    try:
        cfg.validate_parallel(plan.tp, 1)
    except ConfigError as err:
        return f"{err} ({tp_explanation(cfg, max(8, plan.tp))})"
    reason = cp_refusal(cfg, plan.tp, plan.cp, job.seq_length, job.num_gpus)
    if reason is not None:
        return reason
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
    stages = parsed_layout(cfg).stage_sizes
    if stages is not None and tuple(stages) != tuple(plan.stage_sizes):
        return (f"--hybrid-layer-pattern fixes the stages {list(stages)}; the plan has "
                f"{list(plan.stage_sizes)}")
    if sum(plan.stage_sizes) != cfg.num_layers or len(plan.stage_sizes) != plan.pp:
        return (f"stage sizes {list(plan.stage_sizes)} do not split {cfg.num_layers} layers in "
                f"{plan.pp} stages")
    if job.global_batch_size % (plan.mbs * plan.dp):
        return (f"--global-batch-size {job.global_batch_size} is not divisible by "
                f"--micro-batch-size {plan.mbs} x data-parallel size {plan.dp}")
    if plan.sequence_parallel and job.seq_length % (plan.tp * plan.cp):
        return (f"--sequence-parallel: --seq-length {job.seq_length} must be divisible by "
                f"--tensor-model-parallel-size {plan.tp} x --context-parallel-size {plan.cp}")
    return None


def min_max_partition(num_layers: int, parts: int,
                      cost: Callable[[int, int, int], float]) -> tuple[int, ...]:
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


def even_split(num_layers: int, pp: int) -> tuple[int, ...] | None:
    """megatron-core's even split, or None when PP does not divide the layers."""
    return (num_layers // pp,) * pp if num_layers % pp == 0 else None


def _tp_allowed(cfg: OlmoHybridConfig, tp: int) -> bool:
    try:
        cfg.validate_parallel(tp, 1)
        return True
    except ConfigError:
        return False


def cp_candidates(job: Job, pins: Pins, long_only: bool = True) -> list[int]:
    """CP values to search: the pinned one; else 1 and, for sequences of ``CP_MIN_SEQ_LENGTH``
    tokens or more (or with ``long_only=False``: the fallback when no CP = 1 plan fits), every
    power of two > 1 that divides the GPUs and the sequence length."""
    if pins.cp:
        return [pins.cp]
    cps = [1]
    if job.seq_length >= CP_MIN_SEQ_LENGTH or not long_only:
        c = 2
        while c <= job.num_gpus:
            if job.num_gpus % c == 0 and job.seq_length % c == 0:
                cps.append(c)
            c *= 2
    return cps


def candidate_grid(cfg: OlmoHybridConfig, job: Job, pins: Pins,
                   cps: Sequence[int] | None = None) -> Iterator[Plan]:
    """Every (TP, CP, PP, mbs, recompute, distributed optimizer) combination to consider, each
    with the pattern's '|' stages, else the even split, else ``()`` (to be balanced).

    ``cps``: the CP values (default ``cp_candidates(job, pins)``). A TP the model refuses is
    yielded once per TP, a CP the heads or the sequence refuse once per (TP, CP), a layout that
    does not divide the GPUs once per (TP, CP, PP) (other dimensions at their first value), so
    that the report names the reason.
    """
    cps = list(cps) if cps is not None else cp_candidates(job, pins)
    tps = [pins.tp] if pins.tp else [t for t in divisors(job.num_gpus) if t <= job.gpus_per_node]
    recomputes = [pins.recompute] if pins.recompute else list(RECOMPUTE)
    dos = ([pins.distributed_optimizer] if pins.distributed_optimizer is not None
           else [True, False])
    fixed = parsed_layout(cfg).stage_sizes
    for tp in tps:
        tp_ok = _tp_allowed(cfg, tp)
        for cp in cps:
            yield from _tp_cp_grid(cfg, job, pins, tp, cp, tp_ok, recomputes, dos, fixed)
            if not tp_ok:
                break


def _tp_cp_grid(cfg, job, pins, tp, cp, tp_ok, recomputes, dos, fixed) -> Iterator[Plan]:
    """``candidate_grid`` for one (TP, CP)."""
    gbs = job.global_batch_size
    if fixed is not None:
        pps = [len(fixed)]
    elif pins.pp:
        pps = [pins.pp]
    else:
        pps = [d for d in divisors(max(job.num_gpus // (tp * cp), 1)) if d <= cfg.num_layers]
    cp_ok = tp_ok and cp_refusal(cfg, tp, cp, job.seq_length) is None
    for pp in pps:
        mp = tp * pp * cp
        dp = job.num_gpus // mp if job.num_gpus % mp == 0 else 0
        split = tuple(fixed) if fixed else (even_split(cfg.num_layers, pp) or ())
        if not cp_ok or dp == 0 or pp > cfg.num_layers:
            yield Plan(tp, pp, dp, cp, pins.mbs or 1, 0, recomputes[0], dos[0],
                       split or (cfg.num_layers,))
            if not cp_ok:
                return
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
