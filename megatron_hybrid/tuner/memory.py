"""Peak memory of each rank of a plan: static buffers + activations of the in-flight
micro-batches + the largest transient.

Per pipeline stage r of PP (0-based), with m micro-batches per iteration and T = mbs * S / CP
tokens per micro-batch on one rank (context parallelism: each CP rank holds a contiguous S/CP
chunk outside the mixers; inside, the mixers' activations are counted per local token too, see
``activations``):

- static: ``params.static_memory`` (weights, fp32 grads, fp32 main params, exp_avg, exp_avg_sq;
  the distributed optimizer's shard is over DP x CP ranks);
- activations: T * sum over the stage's layers of ``activations.layer_bytes`` (per layer kind),
  times the micro-batches in flight under 1F1B, min(PP - r, m) (megatron-core's
  ``forward_backward_pipelining_without_interleaving``: PP - r - 1 warm-up forwards, then one
  more before the first backward); full recompute adds one layer's full activations (the layer
  being recomputed);
- the last stage adds the head (final norm, LM head input, fp32 softmax and z-loss exp) for one
  micro-batch and the head's backward transient; every stage the largest layer-backward
  transient plus the weight gradient of the largest layer parameter (bf16, before megatron-core's
  hook adds it to the fp32 main grad), whichever of the two phases is larger;
- pipeline buffers: the received input and the kept output of every in-flight micro-batch
  (megatron-core keeps them until the backward; ``deallocate_pipeline_outputs`` is off);
- sequence parallelism: megatron-core's global all-gather buffer of one [S/CP, mbs, D] tensor;
- the optimizer step: torch's foreach AdamW (the default on CUDA) allocates sqrt(exp_avg_sq) for
  all of a param group's shard at once (4 bytes per element; the larger of the Olmo weight-decay
  groups) while activations are gone; the peak is the larger of the two phases.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.tuner.activations import (
    head_terms,
    head_transient,
    in_proj_pad_bytes,
    layer_backward_transient,
    layer_bytes,
    local_shapes,
)
from megatron_hybrid.tuner.params import StaticBytes, stage_parameters, worst_static_memory
from megatron_hybrid.tuner.plans import Job, Plan, parsed_layout

GIB = 2 ** 30
#: cuBLAS workspaces, RoPE tables, the batch, the loss scalars: allocated but small (bytes).
RUNTIME_ALLOWANCE = 256 * 2 ** 20


@dataclass
class RankMemory:
    """Memory of one rank (bytes). ``peak`` is the larger of ``peak_fwd_bwd`` and ``peak_step``.
    ``tokens``: tokens of one micro-batch on this rank (mbs x S / CP)."""

    pp_rank: int
    static: StaticBytes
    in_flight: int
    layers: dict[str, int]                     # layer kind -> count in this stage
    bytes_per_token: dict[str, float]          # layer kind -> saved bytes per token per layer
    activations: float                         # all in-flight micro-batches
    recompute_extra: float                     # full recompute: one layer's activations
    head: float                                # last stage: saved head / loss tensors
    head_transient: float
    layer_transient: float
    pipeline_buffers: float
    sp_buffer: float
    runtime: float = RUNTIME_ALLOWANCE
    step_transient: float = 0.0
    tokens: int = 0

    @property
    def peak_fwd_bwd(self) -> float:
        """Bytes at the start of the backward of the last in-flight micro-batch."""
        base = self.static.total + self.activations + self.pipeline_buffers + self.sp_buffer \
            + self.runtime
        inner = self.recompute_extra + self.layer_transient
        return base + max(self.head + self.head_transient, inner)

    @property
    def peak_step(self) -> float:
        """Bytes during the optimizer step (no activations)."""
        return self.static.total + self.step_transient + self.sp_buffer + self.runtime

    @property
    def peak(self) -> float:
        """Predicted ``torch.cuda.max_memory_allocated()`` of this rank, bytes."""
        return max(self.peak_fwd_bwd, self.peak_step)


def stage_types(cfg: OlmoHybridConfig, plan: Plan, pp_rank: int) -> list[str]:
    """Layer kinds (``"G"`` / ``"*"``) of stage ``pp_rank``."""
    start = sum(plan.stage_sizes[:pp_rank])
    return list(parsed_layout(cfg).layer_types[start:start + plan.stage_sizes[pp_rank]])


def rank_memory(cfg: OlmoHybridConfig, plan: Plan, job: Job, pp_rank: int) -> RankMemory:
    """Memory of the most loaded rank of pipeline stage ``pp_rank`` (bytes)."""
    s = local_shapes(cfg, plan.tp, plan.sequence_parallel, job.bf16, plan.cp)
    static = worst_static_memory(cfg, plan.tp, tuple(plan.stage_sizes), pp_rank, plan.dp,
                                 bf16=job.bf16, distributed_optimizer=plan.distributed_optimizer,
                                 overlap_grad_reduce=job.overlap_grad_reduce,
                                 ddp_bucket_size=job.ddp_bucket_size, cp=plan.cp)
    tokens = plan.local_tokens(job.seq_length)
    types = stage_types(cfg, plan, pp_rank)
    kinds = sorted(set(types))
    counts = {k: types.count(k) for k in kinds}
    per_token = {k: layer_bytes(s, k, plan.recompute, plan.mbs) for k in kinds}
    per_mb = tokens * sum(counts[k] * per_token[k] for k in kinds)
    if plan.recompute != "full":  # full recompute: one layer's copy, inside recompute_extra
        per_mb += counts.get("G", 0) * in_proj_pad_bytes(s)
    in_flight = min(plan.pp - pp_rank, max(plan.num_microbatches, 1))
    recompute_extra = tokens * max(layer_bytes(s, k, "none", plan.mbs) for k in kinds) \
        + ("G" in kinds) * in_proj_pad_bytes(s) if plan.recompute == "full" else 0.0
    largest = max(n for name, n in stage_parameters(cfg, plan.tp, plan.stage_sizes, pp_rank)
                  if name.startswith("decoder.layers."))
    layer_transient = tokens * max(layer_backward_transient(s, k) for k in kinds) \
        + largest * s.a
    last = pp_rank == plan.pp - 1
    head = tokens * sum(b for _, b in head_terms(s, job.z_loss)) if last else 0.0
    head_tr = tokens * head_transient(s, job.z_loss) if last else 0.0
    boundaries = (pp_rank > 0) + (not last)
    pipe = in_flight * boundaries * tokens * s.a * s.h if plan.pp > 1 else 0.0
    sp_buffer = tokens * s.a * s.D if plan.sequence_parallel else 0.0
    return RankMemory(pp_rank=pp_rank, static=static, in_flight=in_flight, layers=counts,
                      bytes_per_token=per_token, activations=in_flight * per_mb,
                      recompute_extra=recompute_extra, head=head, head_transient=head_tr,
                      layer_transient=layer_transient, pipeline_buffers=pipe,
                      sp_buffer=sp_buffer,
                      step_transient=4.0 * static.largest_group_numel, tokens=tokens)


def plan_memory(cfg: OlmoHybridConfig, plan: Plan, job: Job) -> list[RankMemory]:
    """``rank_memory`` of every pipeline stage, first to last."""
    return [rank_memory(cfg, plan, job, r) for r in range(plan.pp)]


def peak_memory(cfg: OlmoHybridConfig, plan: Plan, job: Job) -> float:
    """The largest per-rank peak of the plan (bytes)."""
    return max(m.peak for m in plan_memory(cfg, plan, job))
