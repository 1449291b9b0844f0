"""The activation model (megatron_hybrid/tuner/activations.py) against the tensors autograd really
saves: one layer of each kind built from the trainer's specs, bf16, on CPU, with a
saved-tensors hook counting the distinct storages kept for backward (parameters excluded).

The attention layer runs as on the GPU (torch SDPA with flash attention keeps q, k, v, output
and log-sum-exp on CPU too). The GDN layer's three fla kernels do not run on CPU: they are
replaced by stand-ins that save exactly what fla 0.6.0's autograd functions save
(``CausalConv1dFunction``: its input as given; ``ChunkGatedDeltaRuleFunction``: L2-normalised
q, k + rstd, contiguous v, cumsummed g, beta, A; ``LayerNormGatedFunction``: o, contiguous gate,
rstd), so that the test checks how the layer code around them retains tensors. The model's
RMSNorms get the same treatment (fla's ``LayerNormFunction``: x and the fp32 rstd).
"""
from __future__ import annotations

import megatron.core.parallel_state as ps
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module

import megatron_hybrid.kernels.gdn_mixer as gdn_module  # the GDN layer calls the kernels from here
import megatron_hybrid.layers.norms as norms_module
from megatron_hybrid.config import preset_config
from megatron_hybrid.kernels import (
    chunk_gated_delta_rule_torch,
    gated_rms_norm_torch,
    l2_norm,
    rms_norm_torch,
    short_conv_torch,
)
from megatron_hybrid.layers.layer_specs import attention_layer_spec, gdn_layer_spec
from megatron_hybrid.tuner.activations import layer_bytes, local_shapes
from tests.dist import run_distributed

S, B = 128, 2


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        with torch.no_grad():
            return short_conv_torch(x, w, activation="silu")


class _GDN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        qn, kn = l2_norm(q), l2_norm(k)
        rq = torch.empty(q.shape[:-1], dtype=torch.float32)
        rk = torch.empty(k.shape[:-1], dtype=torch.float32)
        Bq, T, HV = v.shape[:3]
        A = k.new_empty(Bq, T, HV, 64)
        ctx.save_for_backward(qn, rq, kn, rk, v, g.clone(), beta, A)
        with torch.no_grad():
            return chunk_gated_delta_rule_torch(qn, kn, v, g, beta, scale=scale)[0].to(q.dtype)


class _GatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, w, eps):
        zc = z.contiguous()
        ctx.save_for_backward(x, zc, w, torch.empty(x.shape[:-1], dtype=torch.float32))
        with torch.no_grad():
            return gated_rms_norm_torch(x, z, w, eps)


class _RMSNorm(torch.autograd.Function):  # fla LayerNormFunction (is_rms_norm): x and fp32 rstd
    @staticmethod
    def forward(ctx, x, w, eps):
        ctx.save_for_backward(x, w, torch.empty(x.shape[:-1], dtype=torch.float32))
        with torch.no_grad():
            return rms_norm_torch(x, w, eps)


def _patch_fla_stand_ins() -> None:
    norms_module.rms_norm = lambda x, w, eps=1e-6, backend=None: _RMSNorm.apply(x, w, eps)
    norms_module.select_backend = lambda x: "fla"  # the QK-norms take fla's kernel at TP 1
    gdn_module.short_conv = lambda x, w, activation="silu", cu_seqlens=None, backend=None: \
        _Conv.apply(x, w)
    gdn_module.gated_delta_rule = lambda q, k, v, g, beta, scale=None, **kw: (
        _GDN.apply(q, k, v, g, beta, scale), None)
    norms_module.gated_rms_norm = gdn_module.gated_rms_norm = \
        lambda x, z, w, eps=1e-5, backend=None: _GatedNorm.apply(x, z, w, eps)


def _saved_bytes(layer, x, **kwargs) -> int:
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() != 0:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, None, **kwargs)
    return sum(seen.values())


def _worker(rank, cases):
    """(measured, predicted) saved bytes per case, in a forked single rank (TP = 1)."""
    assert ps.get_tensor_model_parallel_world_size() == 1
    _patch_fla_stand_ins()  # this forked process only
    cfg = preset_config("tiny")
    out = {}
    for kind, recompute in cases:
        kw = dict(bf16=True)  # kernel backend auto: the norms' fla stand-ins above
        if recompute != "none":
            kw["recompute_granularity"] = recompute
        tcfg = cfg.to_transformer_config(1, 1, params_dtype=torch.bfloat16, **kw)
        spec = gdn_layer_spec() if kind == "G" else attention_layer_spec()
        layer = build_module(spec, config=tcfg, layer_number=1)
        x = torch.randn(S, B, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        extra = {}
        if kind == "*":
            extra["rotary_pos_emb"] = RotaryEmbedding(cfg.kv_channels, rotary_percent=1.0,
                                                      rotary_base=cfg.rotary_base)(S)
        measured = _saved_bytes(layer, x, **extra)
        s = local_shapes(cfg, 1, False, bf16=True)
        out[(kind, recompute)] = (measured, layer_bytes(s, kind, recompute, B) * S * B)
    return out


CASES = [("*", "none"), ("*", "selective"), ("G", "none")]


def test_saved_bytes_per_layer_match_the_model():
    results = run_distributed(_worker, 1, CASES)[0]
    for case, (measured, predicted) in results.items():
        # only the fp32 copies of the norm weights ([D], not per token) are left out of the model
        assert abs(measured - predicted) / measured < 0.01, (case, measured, predicted)
