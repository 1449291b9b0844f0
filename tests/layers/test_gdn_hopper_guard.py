"""The GDN layer consults fla's Hopper guard policy (``runtime/hopper_guard.py``) before an fla
forward that a backward will follow, with this rank's head counts, and never on the torch path."""
from __future__ import annotations

import torch
from megatron.core.transformer.spec_utils import build_module

import megatron_hybrid.layers.gated_delta_net as gdn_layer
from megatron_hybrid.config import preset_config
from megatron_hybrid.layers.layer_specs import gdn_layer_spec
from megatron_hybrid.runtime import hopper_guard
from tests.dist import run_distributed


def _worker(rank):
    cfg = preset_config("tiny", vocab_size=512)
    tc = cfg.to_transformer_config(2, 1)
    mixer = build_module(gdn_layer_spec(), config=tc, layer_number=1).self_attention
    calls, backend = [], {"name": "torch"}
    originals = (hopper_guard.ensure_fla_gdn_backward_allowed, gdn_layer.resolve_backend, gdn_layer.gdn_mixer)
    hopper_guard.ensure_fla_gdn_backward_allowed = lambda *a, **kw: calls.append((*a[:3], kw))
    gdn_layer.resolve_backend = lambda b, dev: backend["name"]
    # stand-in for the fla mixer (CPU): the right output shape, from the projection
    gdn_layer.gdn_mixer = lambda proj, *a, **kw: proj[..., :mixer.value_dim // 2]
    try:
        x = torch.randn(8, 1, cfg.hidden_size)
        mixer(x)                                  # torch path: no policy
        backend["name"] = "fla"
        with torch.no_grad():
            mixer(x)                              # no backward follows: no policy
        mixer(x)
    finally:
        (hopper_guard.ensure_fla_gdn_backward_allowed, gdn_layer.resolve_backend,
         gdn_layer.gdn_mixer) = originals
    return calls


def test_layer_applies_hopper_policy_before_fla_training_forward():
    cfg = preset_config("tiny", vocab_size=512)
    for calls in run_distributed(_worker, 2, tp=2):
        assert calls == [(cfg.linear_key_head_dim, cfg.linear_value_head_dim, torch.float32,
                          {"H": cfg.linear_num_key_heads // 2, "HV": cfg.linear_num_value_heads // 2})]
