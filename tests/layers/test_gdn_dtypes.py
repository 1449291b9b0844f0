"""With bf16 parameters the GDN decay g = -exp(A_log) * softplus(a + dt_bias) is computed in fp32
(docs/model.md §4.5; megatron-core 0.16 computes A_log.exp() in bf16: docs/model.md §7 difference 3)."""
from __future__ import annotations

import torch
from megatron.core.transformer.spec_utils import build_module

import megatron_hybrid.kernels.gdn_mixer as gdn_module  # the GDN layer calls the kernels from here
from megatron_hybrid.config import preset_config
from megatron_hybrid.layers.layer_specs import gdn_layer_spec
from tests.dist import run_distributed


def _worker(rank):
    cfg = preset_config("tiny", vocab_size=512)
    tc = cfg.to_transformer_config(1, 1, params_dtype=torch.bfloat16, bf16=True)
    mixer = build_module(gdn_layer_spec(), config=tc, layer_number=1).self_attention
    seen = {}

    def capture(q, k, v, g, beta, **kw):
        seen.update(g=g, beta=beta)
        return torch.zeros_like(v), None

    original = gdn_module.gated_delta_rule
    gdn_module.gated_delta_rule = capture
    try:
        x = torch.randn(16, 2, cfg.hidden_size, dtype=torch.bfloat16)
        with torch.no_grad():
            mixer(x)
            proj = mixer.in_proj(x)[0].transpose(0, 1)
    finally:
        gdn_module.gated_delta_rule = original
    hv = cfg.linear_num_value_heads
    a, b = proj[..., -hv:].double(), proj[..., -2 * hv:-hv].double()
    g_ref = -mixer.A_log.double().exp() * torch.nn.functional.softplus(a + mixer.dt_bias.double())
    beta_ref = 2 * torch.sigmoid(b)
    return (seen["g"].dtype, float((seen["g"].double() - g_ref).norm() / g_ref.norm()),
            float((seen["beta"].double() - beta_ref).norm() / beta_ref.norm()))


def test_decay_is_fp32_with_bf16_parameters():
    dtype, g_err, beta_err = run_distributed(_worker, 1)[0]
    assert dtype == torch.float32
    assert g_err < 1e-6, g_err      # bf16 arithmetic would be ~1e-3
    assert beta_err < 1e-2, beta_err  # beta is handed to the kernel in the activation dtype
