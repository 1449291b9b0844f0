"""The Olmo Hybrid Gated DeltaNet mixer as a megatron-core module (spec ``docs/model.md`` §4, §7).

Letters: S sequence length (S/TP per rank under sequence parallelism), B micro-batch, D hidden
size, H / HV GDN key / value heads (H_l = H/TP, HV_l = HV/TP per rank), Dk / Dv key / value head
dims, C conv channels per rank = 2*H_l*Dk + HV_l*Dv, W conv kernel width.

The fused column-parallel ``in_proj`` and the conv are laid out as
``config.gdn_projection.GdnProjectionLayout`` says (per TP rank the rank's slice of every segment,
so the full tensor is interleaved by rank); ``sharded_state_dict`` stores them as the layout's named
segments, which reshard across TP (docs/model.md §7).
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

from megatron_hybrid.config.gdn_projection import CONV_NAMES, IN_PROJ_NAMES, GdnProjectionLayout
from megatron_hybrid.init import trunc_normal_init
from megatron_hybrid.kernels import resolve_backend
from megatron_hybrid.kernels.gdn_mixer import gdn_mixer
from megatron_hybrid.layers.context_parallel import cp_size, heads_to_seq, seq_to_heads
from megatron_hybrid.layers.norms import HeadwiseGatedRMSNorm
from megatron_hybrid.runtime import hopper_guard


@dataclass
class GatedDeltaNetSubmodules:
    """Module specs of the GDN mixer's parallel linears (the backend seam)."""

    in_proj: ModuleSpec | type = None
    out_proj: ModuleSpec | type = None


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
        lay = self.proj_layout = GdnProjectionLayout.from_config(config)  # raises unless G = HV/H is whole
        local = lay.per_rank(tp)                 # this rank's heads; raises when TP does not divide
        self.num_key_heads, self.num_value_heads = lay.num_key_heads, lay.num_value_heads
        self.key_head_dim, self.value_head_dim = lay.key_head_dim, lay.value_head_dim
        self.key_dim, self.value_dim = lay.key_dim, lay.value_dim
        self.in_proj_dim, self.conv_dim = lay.in_proj_dim, lay.conv_dim
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
            torch.nn.Conv1d, local.conv_dim, local.conv_dim,
            kernel_size=self.conv_kernel_dim, groups=local.conv_dim, bias=False,
            padding=self.conv_kernel_dim - 1, dtype=config.params_dtype)
        hv_local = local.num_value_heads
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
        self.in_proj.weight.copy_(self.proj_layout.tp_shard_in_proj(full, r, tp))
        conv = torch.empty(self.conv_dim, 1, self.conv_kernel_dim)
        trunc_normal_init(self.config.init_method_std)(conv)
        self.conv1d.weight.copy_(self.proj_layout.tp_shard_conv(conv, r, tp))
        a = torch.empty(hv).uniform_(*a_log_range)
        dt = torch.exp(torch.rand(hv) * (math.log(dt_range[1]) - math.log(dt_range[0]))
                       + math.log(dt_range[0])).clamp(min=dt_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        self.A_log.copy_(self.proj_layout.tp_shard_heads(torch.log(a), r, tp))
        self.dt_bias.copy_(self.proj_layout.tp_shard_heads(inv_dt, r, tp))

    def forward(self, hidden_states, attention_mask=None, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                packed_seq_params=None, sequence_len_offset=None, **_unused):
        if inference_context is not None:
            raise NotImplementedError("GDN inference with a recurrent-state cache is not supported "
                                      "in the Megatron model; convert to HF transformers to generate")
        tp = self.tp_size
        cu_seqlens = None
        if packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None:
            cu_seqlens = packed_seq_params.cu_seqlens_q.to(torch.long)

        proj, _ = self.in_proj(hidden_states)            # [S, B, in_proj_dim/TP]
        conv_w, A_log, dt_bias = self.conv1d.weight, self.A_log, self.dt_bias
        cp = cp_size()
        if cp > 1:  # whole sequence, 1/CP of the heads (context_parallel.py)
            c, lay = parallel_state.get_context_parallel_rank(), self.proj_layout
            proj = seq_to_heads(proj, list(lay.in_proj_sizes(tp)))
            conv_w = lay.cp_shard_conv(conv_w, c, cp, tp)
            A_log, dt_bias = lay.cp_shard_heads(A_log, c, cp, tp), lay.cp_shard_heads(dt_bias, c, cp, tp)
        if torch.is_grad_enabled() and proj.requires_grad and resolve_backend(self.backend, proj) == "fla":
            # fla's Hopper guard refuses the backward: refuse (or self-check) before the forward,
            # with the heads this GPU computes
            gpu = self.proj_layout.per_rank(tp * cp, flag="TP x CP")
            hopper_guard.ensure_fla_gdn_backward_allowed(
                self.key_head_dim, self.value_head_dim, proj.dtype, proj.device,
                H=gpu.num_key_heads, HV=gpu.num_value_heads)
        o = gdn_mixer(proj, conv_w, A_log, dt_bias, self.out_norm.weight_for_forward(),
                      key_head_dim=self.key_head_dim, value_head_dim=self.value_head_dim,
                      allow_neg_eigval=self.allow_neg_eigval, norm_eps=self.out_norm.eps,
                      cu_seqlens=cu_seqlens, backend=self.backend)   # [S, B, value_dim/TP/CP]
        if cp > 1:
            o = heads_to_seq(o)                          # [S/CP, B, value_dim/TP]
        out, bias = self.out_proj(o)
        return out, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Dist-checkpoint view: in_proj and conv1d split into the layout's named segments
        (``IN_PROJ_NAMES``, ``CONV_NAMES``), A_log / dt_bias / conv sharded on dim 0, out_norm
        replicated; every segment is stored in its global layout, so a checkpoint reshards across
        TP."""
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
            conv[f"{prefix}conv1d.weight"], list(self.proj_layout.conv_sizes(tp)),
            list(CONV_NAMES), 0)
        for name in ("in_proj", "out_proj", "out_norm"):
            sd.update(sharded_state_dict_default(getattr(self, name), f"{prefix}{name}.",
                                                 sharded_offsets, metadata,
                                                 tp_group=groups["tp_group"]))
        sd[f"{prefix}in_proj.weight"] = _split_tensor_factory(
            sd[f"{prefix}in_proj.weight"], list(self.proj_layout.in_proj_sizes(tp)),
            list(IN_PROJ_NAMES), 0)
        return sd
