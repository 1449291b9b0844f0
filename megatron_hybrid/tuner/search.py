"""Evaluate and rank plans: refuse, size, time.

``search`` expands the candidate grid (``plans.candidate_grid``) with pipeline splits (the even
one, one that balances stage time and one that balances stage memory: uneven first / last stages
when the embedding, the LM head or the 1F1B in-flight micro-batches make them heavier), checks
each plan's constraints, predicts its peak memory per rank and, when it fits, its throughput.
Ranking: plans that fit by estimated tokens/s/GPU (ties: less memory), then plans that do not
fit by memory, then refused plans.

Context parallelism: the grid holds CP > 1 when pinned or for sequences of
``plans.CP_MIN_SEQ_LENGTH`` tokens or more; for shorter ones, when no CP = 1 plan fits, a second
pass adds CP > 1 (``SearchResult.cp_fallback``).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.tuner.activations import head_terms, head_transient, layer_bytes, local_shapes
from megatron_hybrid.tuner.memory import GIB, RankMemory, plan_memory
from megatron_hybrid.tuner.meta_model import embedding_numel, layer_numel
from megatron_hybrid.tuner.plans import (
    Job,
    Pins,
    Plan,
    candidate_grid,
    cp_candidates,
    min_max_partition,
    parsed_layout,
    refusal,
    with_split,
)
from megatron_hybrid.tuner.throughput import Efficiencies, Hardware, Throughput, estimate, layer_flops

#: uneven splits are searched up to this pipeline size (beyond, stages hold few layers)
MAX_PP_FOR_BALANCED_SPLITS = 8


@dataclass
class Evaluation:
    """A plan with its verdict: ``reason`` (refused), memory per stage, throughput."""

    plan: Plan
    reason: str | None = None
    memory: list[RankMemory] | None = None
    throughput: Throughput | None = None
    usable_bytes: float = 0.0

    @property
    def peak(self) -> float:
        """Largest predicted per-rank peak, bytes (inf when refused)."""
        return max(m.peak for m in self.memory) if self.memory else float("inf")

    @property
    def worst_stage(self) -> int:
        """Pipeline stage with the largest peak."""
        return max(range(len(self.memory)), key=lambda r: self.memory[r].peak) if self.memory \
            else 0

    @property
    def fits(self) -> bool:
        """Not refused and the peak is within the usable memory."""
        return self.reason is None and self.peak <= self.usable_bytes

    @property
    def status(self) -> str:
        """``ok``, or why not (one line)."""
        if self.reason is not None:
            return f"refused: {self.reason}"
        if not self.fits:
            return (f"does not fit: {self.peak / GIB:.1f} GiB > {self.usable_bytes / GIB:.1f} GiB "
                    f"usable (stage {self.worst_stage})")
        return "ok"


def evaluate(cfg: OlmoHybridConfig, plan: Plan, job: Job, hw: Hardware = Hardware(),
             eff: Efficiencies = Efficiencies()) -> Evaluation:
    """Refuse, size and (if it fits) time one plan."""
    ev = Evaluation(plan, usable_bytes=hw.usable_bytes)
    ev.reason = refusal(cfg, plan, job)
    if ev.reason is not None:
        return ev
    ev.memory = plan_memory(cfg, plan, job)
    if ev.fits:
        ev.throughput = estimate(cfg, plan, job, hw, eff)
    return ev


def _prefix(values: list[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


def time_balanced_split(cfg: OlmoHybridConfig, plan: Plan, job: Job, hw: Hardware,
                        eff: Efficiencies) -> tuple[int, ...]:
    """Stages that balance compute per micro-batch (the LM head weighs on the last stage);
    seconds per token of each layer as in ``throughput.estimate`` without communication."""
    fl = layer_flops(cfg, job.seq_length)
    s = local_shapes(cfg, plan.tp, plan.sequence_parallel, job.bf16, plan.cp)
    P, BW = hw.peak_tflops * 1e12, hw.hbm_tbps * 1e12

    def layer_cost(kind: str) -> float:
        f = fl[kind]
        return (f["matmul"] / (P * eff.matmul) + f.get("gdn_core", 0.0) / (P * eff.gdn)
                + f.get("attention_core", 0.0) / (P * eff.attention_at(job.seq_length))
                + eff.elementwise_traffic * layer_bytes(s, kind, "none", plan.mbs) / BW)

    pre = _prefix([layer_cost(k) for k in parsed_layout(cfg).layer_types])
    head = fl["head"]["matmul"] / (P * eff.matmul) + eff.elementwise_traffic * sum(
        b for _, b in head_terms(s, job.z_loss)) / BW
    return min_max_partition(cfg.num_layers, plan.pp, lambda i, a, b: pre[b] - pre[a] + (
        head if i == plan.pp - 1 else 0.0))


def memory_balanced_split(cfg: OlmoHybridConfig, plan: Plan, job: Job) -> tuple[int, ...]:
    """Stages that balance peak memory: static bytes of the layers, the first stage's embedding,
    activations times the 1F1B in-flight micro-batches, the last stage's head (mbs x S/CP tokens
    per micro-batch; the optimizer sharded over DP x CP)."""
    s = local_shapes(cfg, plan.tp, plan.sequence_parallel, job.bf16, plan.cp)
    tokens = plan.local_tokens(job.seq_length)
    per_param = (2 if job.bf16 else 4) + 4 + ((4 if job.bf16 else 0) + 8) / (
        plan.dp_cp if plan.distributed_optimizer else 1)
    types = parsed_layout(cfg).layer_types
    weights = {k: layer_numel(cfg, plan.tp, k) for k in set(types)}
    static = _prefix([per_param * weights[k] for k in types])
    act = _prefix([tokens * layer_bytes(s, k, plan.recompute, plan.mbs)
                   for k in types])
    vocab = per_param * embedding_numel(cfg, plan.tp)
    head = tokens * (sum(b for _, b in head_terms(s, job.z_loss)) + head_transient(s, job.z_loss))
    m = max(plan.num_microbatches, 1)

    def cost(i: int, a: int, b: int) -> float:
        c = static[b] - static[a] + min(plan.pp - i, m) * (act[b] - act[a])
        if i == 0:
            c += vocab
        if i == plan.pp - 1:
            c += head + (vocab if cfg.untie_embeddings_and_output_weights else 0.0)
        return c

    return min_max_partition(cfg.num_layers, plan.pp, cost)


def expand_splits(cfg: OlmoHybridConfig, plan: Plan, job: Job, hw: Hardware,
                  eff: Efficiencies, cache: dict) -> list[Plan]:
    """``plan`` with each distinct candidate split (even / time-balanced / memory-balanced)."""
    if plan.pp == 1 or parsed_layout(cfg).stage_sizes is not None or plan.dp == 0:
        return [plan if plan.stage_sizes else with_split(plan, (cfg.num_layers,))]
    splits = []
    if plan.stage_sizes:
        splits.append(tuple(plan.stage_sizes))
    if plan.pp <= MAX_PP_FOR_BALANCED_SPLITS or not plan.stage_sizes:
        key = ("time", plan.tp, plan.cp, plan.pp, plan.mbs)
        if key not in cache:
            cache[key] = time_balanced_split(cfg, plan, job, hw, eff)
        splits.append(cache[key])
        key = ("mem", plan.tp, plan.cp, plan.pp, plan.dp, plan.mbs, plan.recompute,
               plan.distributed_optimizer)
        if key not in cache:
            cache[key] = memory_balanced_split(cfg, plan, job)
        splits.append(cache[key])
    return [with_split(plan, sp) for sp in dict.fromkeys(splits)]


class SearchResult(list):
    """The ranked evaluations (a list, best first) with how CP was searched: ``cps`` the CP
    values of the grid, ``cp_fallback`` True when CP > 1 was added because no CP = 1 plan fit."""

    cps: tuple[int, ...] = (1,)
    cp_fallback: bool = False


def search(cfg: OlmoHybridConfig, job: Job, pins: Pins = Pins(), hw: Hardware = Hardware(),
           eff: Efficiencies = Efficiencies()) -> SearchResult:
    """Every candidate plan evaluated and ranked (best first); CP as in the module docstring."""
    cache: dict = {}
    out = []
    cps = cp_candidates(job, pins)

    def run(values: list[int]) -> None:
        for plan in candidate_grid(cfg, job, pins, values):
            for p in expand_splits(cfg, plan, job, hw, eff, cache):
                out.append(evaluate(cfg, p, job, hw, eff))

    run(cps)
    fallback = False
    if not any(ev.fits for ev in out) and pins.cp is None:
        more = [c for c in cp_candidates(job, pins, long_only=False) if c not in cps]
        if more:
            run(more)
            cps, fallback = cps + more, True

    def key(ev: Evaluation):
        if ev.reason is not None:
            return (2, 0.0, 0.0)
        if not ev.fits:
            return (1, ev.peak, 0.0)
        return (0, -ev.throughput.tokens_per_s_per_gpu, ev.peak)

    result = SearchResult(sorted(out, key=key))
    result.cps, result.cp_fallback = tuple(cps), fallback
    return result
