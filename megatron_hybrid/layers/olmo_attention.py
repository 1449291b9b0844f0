"""Olmo attention mixer: full-width QK RMSNorm, RoPE (rotate-half) or NoPE, causal SDPA (docs/model.md §3).

Letters: S sequence length (S/TP per rank under sequence parallelism on input), B micro-batch,
D hidden size, Ha attention (query) heads, G key/value groups (``num_query_groups``; G = Ha for
MHA), Dh head dim; ``_l`` suffix = per TP rank (Ha_l = Ha/TP, G_l = G/TP).

``linear_qkv`` rows follow megatron-core's GQA layout: per key/value group g,
[q heads of g (Ha/G of them); k_g; v_g], each Dh rows (for MHA: [q_h; k_h; v_h] per head).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_hybrid.init import trunc_normal_init
from megatron_hybrid.layers.context_parallel import cp_size, heads_to_seq, seq_to_heads
from megatron_hybrid.layers.document_attention import packed_causal_attention
from megatron_hybrid.layers.norms import TPFullWidthRMSNorm


@dataclass
class OlmoAttentionSubmodules:
    """Module specs of the attention's parallel linears (the backend seam)."""

    linear_qkv: ModuleSpec | type = None
    linear_proj: ModuleSpec | type = None


def document_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every packed token within its document: [S] (0 at each ``cu_seqlens``)."""
    cu = cu_seqlens.to(torch.long).cpu()
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])
    return torch.arange(total) - starts


class OlmoSelfAttention(MegatronModule):
    """Olmo self-attention: q/k RMSNorm over the full width before the head split, exact under TP.

    Args:
        config: TransformerConfig (``num_attention_heads``, ``num_query_groups``, ``kv_channels``,
            ``layernorm_epsilon``).
        submodules: OlmoAttentionSubmodules.
        layer_number: 1-based layer number within the stage.

    Forward: hidden_states [S, B, D] -> (out [S, B, D], None). ``rotary_pos_emb`` [S, 1, 1, Dh]
    (megatron-core's RotaryEmbedding; None for NoPE). ``packed_seq_params.cu_seqlens_q`` gives a
    document-causal mask (B = 1).

    Raises: ValueError when TP does not divide the heads or groups.
    """

    def __init__(self, config, submodules: OlmoAttentionSubmodules, layer_number: int = None,
                 pg_collection=None, **_unused):
        super().__init__(config)
        self.layer_number = layer_number
        self._recompute_core_attention = (
            config.recompute_granularity == "selective"
            and "core_attn" in (getattr(config, "recompute_modules", None) or ["core_attn"]))
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_query_groups or config.num_attention_heads
        self.head_dim = config.kv_channels
        for name, n in (("num_attention_heads", self.num_heads),
                        ("num_query_groups", self.num_groups)):
            if n % tp:
                raise ValueError(f"{name} = {n} is not divisible by --tensor-model-parallel-size {tp}")
        if self.num_heads % self.num_groups:
            raise ValueError(f"num_attention_heads {self.num_heads} must be a multiple of "
                             f"num_query_groups {self.num_groups}")
        self.heads_l = self.num_heads // tp
        self.groups_l = self.num_groups // tp
        q_width, kv_width = self.num_heads * self.head_dim, self.num_groups * self.head_dim
        init = trunc_normal_init(config.init_method_std)
        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size, q_width + 2 * kv_width, config=config,
            init_method=init, gather_output=False, bias=False, skip_bias_add=False, is_expert=False)
        self.q_layernorm = TPFullWidthRMSNorm(config, q_width, eps=config.layernorm_epsilon)
        self.k_layernorm = TPFullWidthRMSNorm(config, kv_width, eps=config.layernorm_epsilon)
        self.linear_proj = build_module(
            submodules.linear_proj, q_width, config.hidden_size, config=config, init_method=init,
            bias=False, input_is_parallel=True, skip_bias_add=True, is_expert=False)

    def forward(self, hidden_states, attention_mask=None, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                packed_seq_params=None, sequence_len_offset=None, **_unused):
        if inference_context is not None:
            raise NotImplementedError("KV-cache inference is not supported in the Megatron model")
        qkv, _ = self.linear_qkv(hidden_states)                  # [S, B, G_l*(Ha/G+2)*Dh]
        S, B = qkv.shape[:2]
        per_group = self.heads_l // self.groups_l
        qkv = qkv.view(S, B, self.groups_l, (per_group + 2) * self.head_dim)
        q, k, v = torch.split(qkv, [per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = self.q_layernorm(q.reshape(S, B, self.heads_l * self.head_dim))
        k = self.k_layernorm(k.reshape(S, B, self.groups_l * self.head_dim))
        heads_l, groups_l = self.heads_l, self.groups_l
        cp = cp_size()
        if cp > 1:  # whole sequence, 1/CP of the heads (context_parallel.py)
            hq, hk = heads_l * self.head_dim, groups_l * self.head_dim
            q, k, v = torch.split(seq_to_heads(torch.cat([q, k, v.reshape(S, B, hk)], -1),
                                               [hq, hk, hk]), [hq // cp, hk // cp, hk // cp], -1)
            S, heads_l, groups_l = S * cp, heads_l // cp, groups_l // cp
        q = q.reshape(S, B, heads_l, self.head_dim)
        k = k.reshape(S, B, groups_l, self.head_dim)
        v = v.reshape(S, B, groups_l, self.head_dim)
        cu_seqlens = None
        if packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None:
            cu_seqlens = packed_seq_params.cu_seqlens_q
        if rotary_pos_emb is not None:
            q_emb, k_emb = (rotary_pos_emb if isinstance(rotary_pos_emb, tuple)
                            else (rotary_pos_emb, rotary_pos_emb))
            if cu_seqlens is None:
                q = apply_rotary_pos_emb(q, q_emb, config=self.config)
                k = apply_rotary_pos_emb(k, k_emb, config=self.config)
            else:  # packed (B = 1): positions restart at every document ([T, h, Dh] layout)
                if B != 1:
                    raise ValueError(f"packed sequences (cu_seqlens) need micro-batch size 1, got {B}")
                pos = document_positions(cu_seqlens, S)
                q = apply_rotary_pos_emb(q, q_emb[pos], config=self.config)
                k = apply_rotary_pos_emb(k, k_emb[pos], config=self.config)
        # [S, B, h, Dh] -> [B, h, S, Dh] for SDPA (flash / cuDNN / efficient kernels on GPU)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        dropout = self.config.attention_dropout if self.training else 0.0

        def core_attention(q, k, v):
            if cu_seqlens is not None:  # intra-document masking, no S x S mask
                return packed_causal_attention(q, k, v, cu_seqlens, self.head_dim ** -0.5,
                                               enable_gqa=per_group > 1, dropout_p=dropout)
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, scale=self.head_dim ** -0.5,
                enable_gqa=per_group > 1)

        if self.training and self._recompute_core_attention:
            # Megatron's selective recompute: keep q/k/v, recompute the attention core
            # (its [B, h, S, S] probabilities on non-flash paths) in the backward pass.
            out = tensor_parallel.checkpoint(core_attention, False, q, k, v)
        else:
            out = core_attention(q, k, v)
        out = out.permute(2, 0, 1, 3).reshape(S, B, heads_l * self.head_dim)
        if cp > 1:
            out = heads_to_seq(out)                      # [S/CP, B, heads/TP * Dh]
        return self.linear_proj(out)
