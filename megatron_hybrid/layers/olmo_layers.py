"""The two Olmo Hybrid layer kinds (spec ``docs/model.md`` §2).

Letters: S sequence length (S/TP per rank under sequence parallelism), B micro-batch, D hidden.

- GDN layer, pre-norm: h = x + GDN(RMS_in(x)); y = h + MLP(RMS_mlp(h)). This is megatron-core's
  ``TransformerLayer`` with ``input_layernorm`` / ``pre_mlp_layernorm`` (built by the spec).
- Attention layer, post-sublayer norm, no input norm:
  h = x + RMS_attn(Attn(x)); y = h + RMS_ffout(MLP(h)). ``OlmoPostNormLayer`` below; the row-
  parallel outputs are reduced (or reduce-scattered under SP) before the norm, which therefore
  sees the full hidden width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.utils import make_viewless_tensor


@dataclass
class OlmoPostNormLayerSubmodules(TransformerLayerSubmodules):
    """TransformerLayerSubmodules plus the two post-sublayer norms of the attention layer."""

    post_self_attn_layernorm: ModuleSpec | type = None
    post_mlp_layernorm: ModuleSpec | type = None


class OlmoPostNormLayer(TransformerLayer):
    """Olmo attention layer: mixer and MLP each followed by an RMSNorm, then the residual add.

    Forward: hidden_states [S, B, D] -> (output [S, B, D], context). Accepts the keyword arguments
    megatron-core's ``TransformerBlock`` passes to every layer.
    """

    def __init__(self, config, submodules: OlmoPostNormLayerSubmodules, layer_number: int = 1,
                 hidden_dropout=None, pg_collection=None, vp_stage=None):
        super().__init__(config, submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection,
                         vp_stage=vp_stage)
        eps = config.layernorm_epsilon
        self.post_self_attn_layernorm = build_module(
            submodules.post_self_attn_layernorm, config=config, hidden_size=config.hidden_size,
            eps=eps)
        self.post_mlp_layernorm = build_module(
            submodules.post_mlp_layernorm, config=config, hidden_size=config.hidden_size, eps=eps)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.hidden_dropout > 0:
            return torch.nn.functional.dropout(x, p=self.hidden_dropout, training=True)
        return x

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, padding_mask=None, **_unused):
        attn_out, _ = self.self_attention(
            hidden_states, attention_mask=attention_mask, inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin, attention_bias=attention_bias,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset)
        hidden_states = hidden_states + self._dropout(self.post_self_attn_layernorm(attn_out))
        mlp_out, _ = self.mlp(hidden_states)
        output = hidden_states + self._dropout(self.post_mlp_layernorm(mlp_out))
        output = make_viewless_tensor(inp=output, requires_grad=output.requires_grad,
                                      keep_graph=True)
        return output, context
