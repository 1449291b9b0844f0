"""Time per iteration, tokens/s/GPU and MFU of a plan.

Per micro-batch of T = mbs * S / CP tokens on one rank, pipeline stage i takes

    t_i = sum over its layers of T * (F_mm / (P e_mm) + F_attn / (P e_attn(S))
                                      + F_gdn / (P e_gdn) + k_ew * A_l / BW) / TP-shares
          + TP collectives + CP all-to-alls + pipeline p2p  (+ the LM head and loss, last stage)

with the FLOPs per token of docs/model.md §10 (``training.flops``: F_mm = 6 x the layer's matmul weights,
F_attn = 6 Ha Dh S causal attention, F_gdn = 3 HV f chunked GDN), P the peak FLOP/s,
A_l the layer's saved activation bytes per token (``activations``; elementwise kernels read and
write them, k_ew HBM bytes per saved byte, calibrated), and recompute adding the forward again
(full: 1/3 of everything; selective: the attention core's forward). The iteration is

    t_iter = sum_i t_i + (m - 1) max_i t_i       (1F1B: fill/drain bubble, uneven stages)
             + exposed DP communication + optimizer step + a fixed per-iteration overhead

DP: the distributed optimizer reduce-scatters the fp32 grad buffer and all-gathers the params
(else one all-reduce), ring volume (DP-1)/DP; with ``--overlap-grad-reduce`` /
``--overlap-param-gather`` only what does not fit under the first stage's last backward / first
forward (and at least one bucket) is exposed. TP with sequence parallelism: per layer 2
all-gathers + 2 reduce-scatters forward and 2 + 2 backward plus 2 all-gathers of saved inputs for
the weight gradients, each of (TP-1)/TP of [S/CP, mbs, D] (no SP: 4 all-reduces of twice that).

CP (head-parallel, ``layers/context_parallel.py``): FLOPs per token do not change (docs/model.md §10; the
attention core is still 6 Ha Dh S per token: each rank runs the whole sequence for
heads/(TP*CP)), a rank computes T = mbs * S/CP tokens' worth. Per layer and micro-batch the mixer
runs 2 all-to-alls forward (its input, C/TP wide per local token: GDN 2 H Dk + 2 HV Dv + 2 HV,
attention q, k, v; and its output, value_dim/TP or qd/TP) and the 2 transposed ones backward (+2
with full recompute), each sending (CP-1)/CP of the rank's T x width tensor, on NVLink when
TP x CP <= GPUs per node (CP ranks are TP apart in megatron-core's tp-cp-dp-pp order), else on
the network. Not overlapped. Gradients are reduced (and the distributed optimizer's params
gathered) over DP x CP ranks.

Efficiency defaults: ``docs/gpu.md`` H200 measurements (bf16): 8192^3 matmul
773 TFLOP/s (78.1 %); causal SDPA fwd+bwd 1.25 / 3.53 / 53.1 ms at T = 4096 / 8192 / 32768
(B=1, H=30, Dh=128: 31 / 44 / 47 % of peak counted as docs/model.md §10's 6 Ha Dh S per token); fla
chunk_gated_delta_rule at the 7B shape fwd+bwd 4.37 ms (3.4 % of peak by docs/model.md §10's count:
memory-bound). k_ew is fitted so that the olmo_hybrid_1b reference run (vocabulary 8192,
sequence 4096, micro-batch 4, one H200, no recompute) gives its measured 46,800 tokens/s/GPU
(2026-11-29, with the aligned in_proj GEMM, fla RMSNorm and the one-softmax loss).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise

from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.training.flops import (
    HOPPER_BF16_PEAK_TFLOPS,
    gdn_core_flops_per_head,
    matmul_params,
    training_flops_per_token,
)
from megatron_hybrid.tuner.activations import cp_all_to_all_widths, head_terms, layer_bytes, local_shapes
from megatron_hybrid.tuner.memory import stage_types
from megatron_hybrid.tuner.params import worst_static_memory
from megatron_hybrid.tuner.plans import Job, Plan, parsed_layout

#: (sequence length, fraction of peak) of torch SDPA causal fwd+bwd on the H200 (docs/model.md §10 count)
ATTENTION_EFFICIENCY = ((4096, 0.3125), (8192, 0.4427), (32768, 0.4709))
#: HBM bytes per element of one foreach-AdamW step on a bf16 model with fp32 main params
#: (grad norm, decay, lerp, addcmul, sqrt, div, add, addcdiv, copy to the bf16 param)
OPTIMIZER_BYTES_PER_PARAM = 94


@dataclass(frozen=True)
class Hardware:
    """GPU and interconnect (defaults: H200 SXM; H100 differs only in memory and HBM speed).

    peak_tflops: dense bf16 TFLOP/s (docs/model.md §10); hbm_tbps: TB/s; nvlink_gbps: GB/s per GPU per
    direction (NVLink 4: 450); network_gbps: GB/s per GPU between nodes (one 400 Gb/s NIC per
    GPU: 50); memory_gib: device memory, GiB; headroom: fraction of it kept free (CUDA context,
    NCCL, allocator fragmentation).
    """

    peak_tflops: float = HOPPER_BF16_PEAK_TFLOPS
    hbm_tbps: float = 4.8
    nvlink_gbps: float = 450.0
    network_gbps: float = 50.0
    memory_gib: float = 80.0
    headroom: float = 0.10

    @property
    def usable_bytes(self) -> float:
        """Memory a plan may use, bytes."""
        return self.memory_gib * 2 ** 30 * (1.0 - self.headroom)


@dataclass(frozen=True)
class Efficiencies:
    """Achieved fractions and calibrated constants (defaults: H200 measurements, see module doc).

    matmul, gdn: fraction of peak; attention: fraction of peak, None = the measured table by
    sequence length; elementwise_traffic: HBM bytes moved per saved activation byte over forward
    and backward; optimizer_stream: fraction of HBM bandwidth of the optimizer's foreach kernels;
    comm: fraction of link bandwidth achieved by NCCL; latency_s: per collective;
    iteration_overhead_s: per iteration (synchronisation, Python).
    """

    matmul: float = 773.0 / 989.4
    attention: float | None = None
    gdn: float = 0.0340
    elementwise_traffic: float = 11.5
    optimizer_stream: float = 0.7
    comm: float = 0.8
    latency_s: float = 20e-6
    iteration_overhead_s: float = 0.005

    def attention_at(self, seq_length: int) -> float:
        """Attention-core efficiency at ``seq_length`` (log-linear between measured points,
        clamped at both ends)."""
        if self.attention is not None:
            return self.attention
        pts = ATTENTION_EFFICIENCY
        if seq_length <= pts[0][0]:
            return pts[0][1]
        for (s0, e0), (s1, e1) in pairwise(pts):
            if seq_length <= s1:
                w = (math.log2(seq_length) - math.log2(s0)) / (math.log2(s1) - math.log2(s0))
                return e0 + w * (e1 - e0)
        return pts[-1][1]


@dataclass
class Throughput:
    """Result of ``estimate``: seconds, bytes and rates (per iteration unless named)."""

    stage_times: list[float]                       # fwd+bwd per micro-batch, s
    stage_parts: list[dict[str, float]]            # per stage: component -> s per micro-batch
    pipeline_s: float
    bubble_s: float
    dp_comm_s: float
    dp_exposed_s: float
    cp_comm_s: float                               # CP all-to-alls of the busiest stage
    optimizer_s: float
    overhead_s: float
    iteration_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    volumes: dict[str, float] = field(default_factory=dict)   # bytes per rank per iteration


def layer_flops(cfg: OlmoHybridConfig, seq_length: int) -> dict[str, dict[str, float]]:
    """Forward+backward FLOPs per token of one layer, by kind and part (docs/model.md §10):
    {'G': {'matmul', 'gdn_core'}, '*': {'matmul', 'attention_core'}, 'head': {'matmul'}}."""
    mm = matmul_params(cfg)
    types = parsed_layout(cfg).layer_types
    n_g = sum(1 for t in types if t == "G")
    n_a = len(types) - n_g
    mlp = mm["mlp"] / cfg.num_layers
    out = {"head": {"matmul": 6.0 * mm["lm_head"]}}
    if n_g:
        out["G"] = {"matmul": 6.0 * (mm["gdn"] / n_g + mlp),
                    "gdn_core": 3.0 * cfg.linear_num_value_heads * gdn_core_flops_per_head(
                        cfg.linear_key_head_dim, cfg.linear_value_head_dim)}
    if n_a:
        out["*"] = {"matmul": 6.0 * (mm["attention"] / n_a + mlp),
                    "attention_core": 6.0 * cfg.num_attention_heads * cfg.kv_channels * seq_length}
    return out


def _ring(size_bytes: float, n: int, bw: float, eff: Efficiencies, all_reduce=False) -> float:
    """Seconds of one ring collective over ``n`` ranks of a ``size_bytes`` tensor."""
    if n <= 1:
        return 0.0
    factor = 2.0 if all_reduce else 1.0
    return factor * (n - 1) / n * size_bytes / (bw * eff.comm) + eff.latency_s


def _all_to_all(size_bytes: float, n: int, bw: float, eff: Efficiencies) -> float:
    """Seconds of one all-to-all over ``n`` ranks of a ``size_bytes`` tensor per rank: each rank
    sends (n-1)/n of it."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * size_bytes / (bw * eff.comm) + eff.latency_s


def cp_layer_comm(cfg: OlmoHybridConfig, plan: Plan, job: Job, kind: str, hw: Hardware,
                  eff: Efficiencies) -> dict[str, float]:
    """One layer's CP all-to-alls per micro-batch on one rank: {'s': seconds, 'bytes': bytes
    sent}. Forward: input and output; backward: both again; full recompute: the forward's again.
    """
    if plan.cp == 1:
        return {"s": 0.0, "bytes": 0.0}
    s = local_shapes(cfg, plan.tp, plan.sequence_parallel, job.bf16, plan.cp)
    tokens = plan.local_tokens(job.seq_length)
    bw = (hw.nvlink_gbps if plan.tp * plan.cp <= job.gpus_per_node else hw.network_gbps) * 1e9
    reps = 3 if plan.recompute == "full" else 2
    sizes = [tokens * s.a * w for w in cp_all_to_all_widths(s, kind)]
    return {"s": reps * sum(_all_to_all(x, plan.cp, bw, eff) for x in sizes),
            "bytes": reps * sum((plan.cp - 1) / plan.cp * x for x in sizes)}


@dataclass(frozen=True)
class _StageRates:
    """What every stage's time needs, computed once per plan (``_stage_rates``)."""

    tokens: int                 # T = mbs * S / CP per micro-batch and rank
    shapes: object              # activations.local_shapes
    flops: dict                 # layer_flops
    peak: float                 # P, FLOP/s
    hbm: float                  # BW, bytes/s
    nvlink: float               # bytes/s
    full: bool                  # full recompute
    selective: bool             # selective recompute
    recompute_factor: float     # 4/3 with full recompute (the forward again), else 1
    slice_bytes: float          # one [S/CP, mbs, D] tensor
    per_layer_tp: float         # TP collectives of one layer, s
    p2p_bw: float               # pipeline send/recv bandwidth, bytes/s
    cp_comm: dict               # cp_layer_comm per layer kind


def _stage_rates(cfg: OlmoHybridConfig, plan: Plan, job: Job, hw: Hardware,
                 eff: Efficiencies) -> _StageRates:
    """Shapes, FLOPs, bandwidths and per-layer TP / CP communication (module docstring)."""
    t, tokens = plan.tp, plan.local_tokens(job.seq_length)
    s = local_shapes(cfg, t, plan.sequence_parallel, job.bf16, plan.cp)
    nvlink, net = hw.nvlink_gbps * 1e9, hw.network_gbps * 1e9
    full = plan.recompute == "full"
    slice_bytes = tokens * s.a * s.D
    if plan.sequence_parallel:
        per_layer_tp = 10 * _ring(slice_bytes, t, nvlink, eff) + (4 if full else 0) * _ring(
            slice_bytes, t, nvlink, eff)
    else:
        per_layer_tp = (4 + (2 if full else 0)) * _ring(slice_bytes, t, nvlink, eff, True)
    # rank order tp-cp-dp-pp: pipeline neighbours are TP*CP*DP ranks apart
    cross_node = (plan.tp * plan.cp * plan.dp >= job.gpus_per_node
                  and job.num_gpus > job.gpus_per_node)
    cp_comm = {k: cp_layer_comm(cfg, plan, job, k, hw, eff)
               for k in set(parsed_layout(cfg).layer_types)}
    return _StageRates(tokens=tokens, shapes=s, flops=layer_flops(cfg, job.seq_length),
                       peak=hw.peak_tflops * 1e12, hbm=hw.hbm_tbps * 1e12, nvlink=nvlink,
                       full=full, selective=plan.recompute == "selective",
                       recompute_factor=4.0 / 3.0 if full else 1.0, slice_bytes=slice_bytes,
                       per_layer_tp=per_layer_tp, p2p_bw=net if cross_node else nvlink,
                       cp_comm=cp_comm)


def _stage_parts(cfg: OlmoHybridConfig, plan: Plan, job: Job, eff: Efficiencies,
                 c: _StageRates, r: int) -> dict[str, float]:
    """Seconds per micro-batch of stage ``r`` by part (matmul, cores, elementwise, TP, CP, PP)."""
    t, tokens, s, fl, P = plan.tp, c.tokens, c.shapes, c.flops, c.peak
    rf, S = c.recompute_factor, job.seq_length
    types = stage_types(cfg, plan, r)
    parts = {"matmul": 0.0, "attention core": 0.0, "gdn core": 0.0, "elementwise": 0.0,
             "tp comm": 0.0, "pp p2p": 0.0}
    if plan.cp > 1:
        parts["cp all-to-all"] = sum(c.cp_comm[k]["s"] for k in types)
    for kind in types:
        f = fl[kind]
        parts["matmul"] += tokens * f["matmul"] * rf / (t * P * eff.matmul)
        if kind == "*":
            extra = 4.0 / 3.0 if (c.full or c.selective) else 1.0
            parts["attention core"] += tokens * f["attention_core"] * extra / (
                t * P * eff.attention_at(S))
        else:
            parts["gdn core"] += tokens * f["gdn_core"] * rf / (t * P * eff.gdn)
        parts["elementwise"] += tokens * eff.elementwise_traffic * rf * layer_bytes(
            s, kind, "none", plan.mbs) / c.hbm
        parts["tp comm"] += c.per_layer_tp + (4 * eff.latency_s if kind == "*" and t > 1 else 0)
    if r == plan.pp - 1:
        parts["matmul"] += tokens * fl["head"]["matmul"] / (t * P * eff.matmul)
        parts["elementwise"] += tokens * eff.elementwise_traffic * sum(
            b for _, b in head_terms(s, job.z_loss)) / c.hbm
        parts["tp comm"] += 3 * _ring(c.slice_bytes, t, c.nvlink, eff) if t > 1 else 0.0
    if r == 0 and t > 1:
        parts["tp comm"] += 2 * _ring(c.slice_bytes, t, c.nvlink, eff)
    if plan.pp > 1:
        n = (r > 0) + (r < plan.pp - 1)
        parts["pp p2p"] = 2 * n * (tokens * s.a * s.h / (c.p2p_bw * eff.comm) + eff.latency_s)
    return parts


def _static_of(cfg: OlmoHybridConfig, plan: Plan, job: Job, r: int):
    """``worst_static_memory`` of stage ``r`` with the job's DDP settings."""
    return worst_static_memory(cfg, plan.tp, tuple(plan.stage_sizes), r, plan.dp, bf16=job.bf16,
                               distributed_optimizer=plan.distributed_optimizer,
                               overlap_grad_reduce=job.overlap_grad_reduce,
                               ddp_bucket_size=job.ddp_bucket_size, cp=plan.cp)


def _data_parallel(cfg: OlmoHybridConfig, plan: Plan, job: Job, hw: Hardware, eff: Efficiencies,
                   t0: float) -> tuple[float, float, float, float, float]:
    """(reduce-scatter or all-reduce s, all-gather s, exposed reduce s, exposed gather s,
    bytes sent per rank) of the gradient / parameter sync over DP x CP; stage 0 (``t0`` s per
    micro-batch) is on the critical path: it finishes its backward last."""
    static = _static_of(cfg, plan, job, 0)
    nvlink, net = hw.nvlink_gbps * 1e9, hw.network_gbps * 1e9
    dp_bw = net if (plan.tp * plan.cp * plan.dp > job.gpus_per_node) else nvlink
    grad_bytes, param_bytes = static.grads, static.params
    n = plan.dp_cp                                          # gradients reduced over DP x CP
    if plan.distributed_optimizer:
        rs = _ring(grad_bytes, n, dp_bw, eff)
        ag = _ring(param_bytes, n, dp_bw, eff)
        dp_volume = (n - 1) / n * (grad_bytes + param_bytes)
    else:
        rs, ag = _ring(grad_bytes, n, dp_bw, eff, True), 0.0
        dp_volume = 2 * (n - 1) / n * grad_bytes
    nb = max(static.num_buckets, 1)
    exposed_rs = max(rs / nb, rs - 2.0 / 3.0 * t0) if job.overlap_grad_reduce else rs
    exposed_ag = (max(ag / nb, ag - 1.0 / 3.0 * t0)
                  if job.overlap_param_gather and plan.distributed_optimizer else ag)
    return rs, ag, exposed_rs, exposed_ag, dp_volume


def estimate(cfg: OlmoHybridConfig, plan: Plan, job: Job, hw: Hardware = Hardware(),
             eff: Efficiencies = Efficiencies()) -> Throughput:
    """Estimate the iteration time of ``plan`` (seconds) and derived tokens/s/GPU and MFU:
    stage times, the 1F1B pipeline, exposed DP communication and the optimizer step."""
    S, t = job.seq_length, plan.tp
    c = _stage_rates(cfg, plan, job, hw, eff)
    parts_all = [_stage_parts(cfg, plan, job, eff, c, r) for r in range(plan.pp)]
    stage_times = [sum(parts.values()) for parts in parts_all]
    cp_volume = [sum(c.cp_comm[k]["bytes"] for k in stage_types(cfg, plan, r))
                 for r in range(plan.pp)]
    tp_volume = [plan.stage_sizes[r] * (10 if plan.sequence_parallel else 8) * c.slice_bytes
                 * (t - 1) / t for r in range(plan.pp)]
    m = max(plan.num_microbatches, 1)
    pipeline = sum(stage_times) + (m - 1) * max(stage_times)
    bubble = pipeline - m * sum(stage_times) / plan.pp
    rs, ag, exposed_rs, exposed_ag, dp_volume = _data_parallel(cfg, plan, job, hw, eff,
                                                               stage_times[0])
    opt_numel = max(_static_of(cfg, plan, job, r).optimizer_numel for r in range(plan.pp))
    optimizer = OPTIMIZER_BYTES_PER_PARAM * opt_numel / (c.hbm * eff.optimizer_stream)
    iteration = pipeline + exposed_rs + exposed_ag + optimizer + eff.iteration_overhead_s
    tps = job.global_batch_size * S / iteration / job.num_gpus
    mfu = tps * training_flops_per_token(cfg, S) / c.peak
    s = c.shapes
    volumes = {"tp per rank": max(tp_volume) * m,
               "cp per rank": max(cp_volume) * m,
               "dp per rank": dp_volume,
               "pp p2p per rank": 2 * 2 * c.tokens * s.a * s.h * m if plan.pp > 1 else 0.0}
    cp_s = m * max(p.get("cp all-to-all", 0.0) for p in parts_all)   # busiest stage, s
    return Throughput(stage_times=stage_times, stage_parts=parts_all, pipeline_s=pipeline,
                      bubble_s=bubble, dp_comm_s=rs + ag, dp_exposed_s=exposed_rs + exposed_ag,
                      cp_comm_s=cp_s,
                      optimizer_s=optimizer, overhead_s=eff.iteration_overhead_s,
                      iteration_s=iteration, tokens_per_s_per_gpu=tps, mfu=mfu, volumes=volumes)

