"""RMSNorm modules of the Olmo Hybrid layers, correct under tensor and sequence parallelism.

Letters: S sequence length (local to the rank under sequence parallelism), B micro-batch,
D hidden size, W a width that is split over the TP ranks (W_local = W / TP).

Norm math (spec ``docs/model.md`` §2): y = x * rsqrt(mean(x^2) + eps) * w in fp32, cast back.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from megatron_hybrid.kernels import gated_rms_norm, rms_norm, select_backend


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dim with a weight replicated on every TP rank.

    Under sequence parallelism each rank sees only its slice of the sequence, so the weight is
    tagged ``sequence_parallel`` and megatron-core's ``finalize_model_grads`` sums its gradient
    over TP (this replaces ``WrappedTorchNorm``, whose sequence-parallel assert fires without
    Transformer Engine: ``docs/megatron_core_notes.md`` §2 #4).

    Args:
        config: the TransformerConfig (reads ``sequence_parallel``, ``params_dtype``).
        hidden_size: D.
        eps: epsilon (1e-6 for Olmo's norms).

    Shapes: x [..., D] -> [..., D] in x.dtype.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.backend = getattr(config, "kernel_backend", None)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, backend=self.backend)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group in forward, and sum the gradients over the group in backward.

    Megatron's ``reduce_from_tensor_model_parallel_region`` has an identity backward, which is
    wrong for a sum whose result every rank consumes (docs/model.md §3: the full-width QK-norm).
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class TPFullWidthRMSNorm(MegatronModule):
    """RMSNorm over a full width W whose channels are split over the TP ranks (QK-norm, docs/model.md §3).

    Each rank holds channels [r*W/TP, (r+1)*W/TP) and that slice of the weight; the mean of x^2 is
    taken over all W channels by all-reducing the local fp32 sum of squares (gradient all-reduced
    too), so TP=2 equals TP=1 exactly up to summation order.

    Args:
        config: TransformerConfig (``tensor_model_parallel_size``, ``params_dtype``).
        full_width: W, e.g. num_heads * head_dim for q.
        eps: epsilon (1e-6).

    Shapes: x [..., W_local] -> [..., W_local] in x.dtype.
    Raises: ValueError if TP does not divide W.
    """

    def __init__(self, config, full_width: int, eps: float = 1e-6):
        super().__init__(config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if full_width % tp:
            raise ValueError(f"QK-norm width {full_width} is not divisible by "
                             f"--tensor-model-parallel-size {tp}")
        self.full_width = full_width
        self.eps = eps
        self.backend = getattr(config, "kernel_backend", None)
        self.weight = torch.nn.Parameter(torch.ones(full_width // tp, dtype=config.params_dtype))
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (parallel_state.get_tensor_model_parallel_world_size() == 1
                and (self.backend or select_backend(x)) == "fla"):  # one rank holds the whole width
            return rms_norm(x, self.weight, self.eps, backend="fla")
        dtype = x.dtype
        xf = x.float()
        sumsq = xf.pow(2).sum(-1, keepdim=True)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            sumsq = _AllReduceSum.apply(sumsq, parallel_state.get_tensor_model_parallel_group())
        y = xf * torch.rsqrt(sumsq / self.full_width + self.eps)
        return (self.weight.float() * y).to(dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Dist-checkpoint view: the weight sharded on dim 0 over TP (global shape [W])."""
        sd = self.state_dict(prefix="", keep_vars=True)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            sd, prefix, {"weight": 0}, sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=metadata["dp_cp_group"])


class HeadwiseGatedRMSNorm(torch.nn.Module):
    """GDN output norm: per head, norm then gate, one weight [Dv] shared by all heads (docs/model.md §4.7).

    y = o * rsqrt(mean(o^2) + eps) * w * silu(z), fp32, one rounding (fla FusedRMSNormGated).

    Every TP rank holds the whole weight but sees only its own heads, so the weight's gradient
    must be summed over TP whether or not sequence parallelism is on. That sum happens inside
    autograd (``copy_to_tensor_model_parallel_region``: identity forward, all-reduce backward);
    the weight is therefore *not* tagged ``sequence_parallel`` (it would be summed twice).
    megatron-core's own GDN misses this with sequence parallelism off and its replicas drift
    (``docs/megatron_core_notes.md`` §5 bug E).

    Shapes: o, z [B, S, HV_local, Dv] -> [B, S, HV_local, Dv] in o.dtype.
    """

    def __init__(self, config, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.backend = getattr(config, "kernel_backend", None)
        self.weight = torch.nn.Parameter(torch.ones(head_dim, dtype=config.params_dtype))

    def weight_for_forward(self) -> torch.Tensor:
        """The weight [Dv] as the forward must use it: behind the TP gradient all-reduce."""
        w = self.weight
        if parallel_state.get_tensor_model_parallel_world_size() > 1 and torch.is_grad_enabled():
            w = copy_to_tensor_model_parallel_region(w)
        return w

    def forward(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(o, z, self.weight_for_forward(), eps=self.eps, backend=self.backend)
