"""The Olmo Hybrid Gated DeltaNet mixer as a megatron-core module (spec ``docs/model.md`` §4, §7).

Letters: S sequence length (S/TP per rank under sequence parallelism), B micro-batch, D hidden
size, H / HV GDN key / value heads (H_l = H/TP, HV_l = HV/TP per rank), Dk / Dv key / value head
dims, C conv channels per rank = 2*H_l*Dk + HV_l*Dv, W conv kernel width.

Per TP rank the fused column-parallel ``in_proj`` holds, in order, the rank's slices of
[q; k; v; z; beta; alpha] (HF q,k,v,g,b,a_proj), so the full tensor is interleaved by rank and
``sharded_state_dict`` splits it into named segments that reshard across TP (docs/model.md §7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.ssm.gated_delta_net import _split_tensor_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from megatron_hybrid.kernels import resolve_backend
from megatron_hybrid.kernels.gdn_mixer import gdn_mixer
from megatron_hybrid.layers.context_parallel import cp_size, head_slice, heads_to_seq, seq_to_heads
from megatron_hybrid.layers.norms import HeadwiseGatedRMSNorm
from megatron_hybrid.runtime import hopper_guard


@dataclass
class GatedDeltaNetSubmodules:
    """Module specs of the GDN mixer's parallel linears (the backend seam)."""

    in_proj: ModuleSpec | type = None
    out_proj: ModuleSpec | type = None


def trunc_normal_init(std: float = 0.02):
    """Truncated normal init, cut at +-3 std (docs/model.md §5: every linear weight and the GDN convs)."""

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std)

    return init_


class OlmoGatedDeltaNet(MegatronModule):
    """Gated DeltaNet mixer (docs/model.md §4): in_proj -> short conv -> gated delta rule -> gated norm -> out_proj.

    Args:
        config: OlmoHybridTransformerConfig (linear_* fields, ``linear_allow_neg_eigval``,
            ``gdn_norm_epsilon``, ``kernel_backend``).
        submodules: GatedDeltaNetSubmodules (column / row parallel linear classes).
        layer_number: 1-based layer number within the stage (megatron-core convention).

    Forward: hidden_states [S, B, D] (already input-normed) -> (out [S, B, D], None).
    Packed documents: ``packed_seq_params.cu_seqlens_q`` [N+1] with B = 1 resets the conv
    history and the recurrent state at every document start.

    Raises:
        ValueError: TP does not divide the key heads or value heads, or HV is not a multiple of H.
    """

    def __init__(self, config, submodules: GatedDeltaNetSubmodules, layer_number: int = None,
                 pg_collection=None, **_unused):
        super().__init__(config)
        self.layer_number = layer_number
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_size = tp
        self.sp = bool(config.sequence_parallel)
        self.num_key_heads = config.linear_num_key_heads
        self.num_value_heads = config.linear_num_value_heads
        self.key_head_dim = config.linear_key_head_dim
        self.value_head_dim = config.linear_value_head_dim
        if self.num_value_heads % self.num_key_heads:
            raise ValueError(f"linear_num_value_heads {self.num_value_heads} must be a multiple of "
                             f"linear_num_key_heads {self.num_key_heads}")
        for name, n in (("linear_num_key_heads", self.num_key_heads),
                        ("linear_num_value_heads", self.num_value_heads)):
            if n % tp:
                raise ValueError(f"{name} = {n} is not divisible by --tensor-model-parallel-size {tp}")
        self.key_dim = self.num_key_heads * self.key_head_dim
        self.value_dim = self.num_value_heads * self.value_head_dim
        self.in_proj_dim = 2 * self.key_dim + 2 * self.value_dim + 2 * self.num_value_heads
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel_dim = config.linear_conv_kernel_dim
        self.allow_neg_eigval = config.linear_allow_neg_eigval
        self.backend = getattr(config, "kernel_backend", None)

        init = trunc_normal_init(config.init_method_std)
        self.in_proj = build_module(
            submodules.in_proj, config.hidden_size, self.in_proj_dim, config=config,
            init_method=init, gather_output=False, bias=False, skip_bias_add=False,
            is_expert=False)
        # Depthwise conv weights [C, 1, W] held as nn.Conv1d for the checkpoint key
        # ``conv1d.weight``; the computation goes through kernels.short_conv.
        # (skip_init: the default init would draw a TP-dependent amount from the RNG)
        self.conv1d = torch.nn.utils.skip_init(
            torch.nn.Conv1d, self.conv_dim // tp, self.conv_dim // tp,
            kernel_size=self.conv_kernel_dim, groups=self.conv_dim // tp, bias=False,
            padding=self.conv_kernel_dim - 1, dtype=config.params_dtype)
        hv_local = self.num_value_heads // tp
        self.A_log = torch.nn.Parameter(torch.empty(hv_local, dtype=config.params_dtype))
        self.dt_bias = torch.nn.Parameter(torch.empty(hv_local, dtype=config.params_dtype))
        for p in (self.conv1d.weight, self.A_log, self.dt_bias):
            p.tensor_model_parallel = True
            p.partition_dim = 0
            p.partition_stride = 1
        self.out_norm = HeadwiseGatedRMSNorm(config, self.value_head_dim, eps=config.gdn_norm_epsilon)
        self.out_proj = build_module(
            submodules.out_proj, self.value_dim, config.hidden_size, config=config,
            init_method=init, bias=False, input_is_parallel=True, skip_bias_add=True,
            is_expert=False)
        if config.perform_initialization:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, a_log_range=(0.0, 16.0), dt_range=(1e-3, 0.1), dt_floor=1e-4):
        """docs/model.md §5 init of in_proj, conv, A_log and dt_bias.

        The full (TP=1) tensors are drawn from the CPU generator, which megatron seeds alike on
        every TP rank, and each rank keeps its slice (for the fused in_proj: its slice of every
        segment), so the model does not depend on TP. Linear and conv weights: truncated normal
        (std ``init_method_std``, cut at +-3 std); A_log = log U(0, 16);
        dt = exp(U(ln 1e-3, ln 0.1)) floored at 1e-4; dt_bias = inverse softplus(dt)
        = dt + log(1 - exp(-dt)).
        """
        tp, r = self.tp_size, parallel_state.get_tensor_model_parallel_rank()
        hv = self.num_value_heads
        full = torch.empty(self.in_proj_dim, self.config.hidden_size)
        trunc_normal_init(self.config.init_method_std)(full)
        segments = [self.key_dim, self.key_dim, self.value_dim, self.value_dim, hv, hv]
        self.in_proj.weight.copy_(torch.cat([seg.chunk(tp)[r] for seg in
                                             torch.split(full, segments)]))
        conv = torch.empty(self.conv_dim, 1, self.conv_kernel_dim)
        trunc_normal_init(self.config.init_method_std)(conv)
        self.conv1d.weight.copy_(self._rank_conv_slice(conv, r, tp))
        a = torch.empty(hv).uniform_(*a_log_range)
        dt = torch.exp(torch.rand(hv) * (math.log(dt_range[1]) - math.log(dt_range[0]))
                       + math.log(dt_range[0])).clamp(min=dt_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        per = hv // tp
        self.A_log.copy_(torch.log(a)[r * per:(r + 1) * per])
        self.dt_bias.copy_(inv_dt[r * per:(r + 1) * per])

    def _rank_conv_slice(self, conv_full: torch.Tensor, r: int, tp: int) -> torch.Tensor:
        """[q|k|v] full conv channels -> rank r's [q_r; k_r; v_r]."""
        kd, vd = self.key_dim // tp, self.value_dim // tp
        q, k, v = torch.split(conv_full, [self.key_dim, self.key_dim, self.value_dim])
        return torch.cat([q[r * kd:(r + 1) * kd], k[r * kd:(r + 1) * kd], v[r * vd:(r + 1) * vd]])

    def forward(self, hidden_states, attention_mask=None, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                packed_seq_params=None, sequence_len_offset=None, **_unused):
        if inference_context is not None:
            raise NotImplementedError("GDN inference with a recurrent-state cache is not supported "
                                      "in the Megatron model; convert to HF transformers to generate")
        tp = self.tp_size
        kd, vd, hv = self.key_dim // tp, self.value_dim // tp, self.num_value_heads // tp
        cu_seqlens = None
        if packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None:
            cu_seqlens = packed_seq_params.cu_seqlens_q.to(torch.long)

        proj, _ = self.in_proj(hidden_states)            # [S, B, in_proj_dim/TP]
        conv_w, A_log, dt_bias = self.conv1d.weight, self.A_log, self.dt_bias
        cp = cp_size()
        if cp > 1:  # whole sequence, 1/CP of the heads (context_parallel.py)
            proj = seq_to_heads(proj, [kd, kd, vd, vd, hv, hv])
            q_w, k_w, v_w = torch.split(conv_w, [kd, kd, vd])
            conv_w = torch.cat([q_w[head_slice(kd)], k_w[head_slice(kd)], v_w[head_slice(vd)]])
            A_log, dt_bias = A_log[head_slice(hv)], dt_bias[head_slice(hv)]
        if torch.is_grad_enabled() and proj.requires_grad and resolve_backend(self.backend, proj) == "fla":
            # fla's Hopper guard refuses the backward: refuse (or self-check) before the forward
            hopper_guard.ensure_fla_gdn_backward_allowed(
                self.key_head_dim, self.value_head_dim, proj.dtype, proj.device,
                H=(conv_w.shape[0] - A_log.numel() * self.value_head_dim) // (2 * self.key_head_dim),
                HV=A_log.numel())
        o = gdn_mixer(proj, conv_w, A_log, dt_bias, self.out_norm.weight_for_forward(),
                      key_head_dim=self.key_head_dim, value_head_dim=self.value_head_dim,
                      allow_neg_eigval=self.allow_neg_eigval, norm_eps=self.out_norm.eps,
                      cu_seqlens=cu_seqlens, backend=self.backend)   # [S, B, value_dim/TP/CP]
        if cp > 1:
            o = heads_to_seq(o)                          # [S/CP, B, value_dim/TP]
        out, bias = self.out_proj(o)
        return out, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Dist-checkpoint view: in_proj split into query/key/value/z/beta/alpha, conv1d into
        query/key/value, A_log / dt_bias / conv sharded on dim 0, out_norm replicated; every
        segment is stored in its global layout, so a checkpoint reshards across TP."""
        tp = self.tp_size
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        groups = dict(tp_group=parallel_state.get_tensor_model_parallel_group(),
                      dp_cp_group=metadata["dp_cp_group"])
        sd = {}
        own = {n: p for n, p in self.named_parameters(recurse=False)}
        sd.update(make_sharded_tensors_for_checkpoint(own, prefix, {"A_log": 0, "dt_bias": 0},
                                                      sharded_offsets, **groups))
        conv = make_sharded_tensors_for_checkpoint(
            {"weight": self.conv1d.weight}, f"{prefix}conv1d.", {"weight": 0}, sharded_offsets,
            **groups)
        sd[f"{prefix}conv1d.weight"] = _split_tensor_factory(
            conv[f"{prefix}conv1d.weight"],
            [self.key_dim // tp, self.key_dim // tp, self.value_dim // tp],
            ["query", "key", "value"], 0)
        for name in ("in_proj", "out_proj", "out_norm"):
            sd.update(sharded_state_dict_default(getattr(self, name), f"{prefix}{name}.",
                                                 sharded_offsets, metadata,
                                                 tp_group=groups["tp_group"]))
        sd[f"{prefix}in_proj.weight"] = _split_tensor_factory(
            sd[f"{prefix}in_proj.weight"],
            [self.key_dim // tp, self.key_dim // tp, self.value_dim // tp, self.value_dim // tp,
             self.num_value_heads // tp, self.num_value_heads // tp],
            ["query", "key", "value", "z", "beta", "alpha"], 0)
        return sd
