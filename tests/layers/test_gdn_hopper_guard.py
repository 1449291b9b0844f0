"""The GDN layer consults fla's Hopper guard policy (``runtime/hopper_guard.py``) before an fla
forward that a backward will follow, with this rank's head counts, and never on the torch path."""
from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.spec_utils import build_module

import megatron_hybrid.layers.gated_delta_net as gdn_layer
from megatron_hybrid.config import preset_config
from megatron_hybrid.layers.layer_specs import gdn_layer_spec
from megatron_hybrid.runtime import hopper_guard
from tests.dist import run_distributed


def _worker(rank, tp=2, cp=1):
    if cp > 1:  # re-create the model-parallel groups with CP (the default group is kept)
        from megatron_hybrid.parallel import initialize_distributed

        initialize_distributed(tp, 1, cp)
    cfg = preset_config("tiny", vocab_size=512)
    tc = cfg.to_transformer_config(tp, 1, context_parallel_size=cp)
    mixer = build_module(gdn_layer_spec(), config=tc, layer_number=1).self_attention
    calls, backend = [], {"name": "torch"}
    originals = (hopper_guard.ensure_fla_gdn_backward_allowed, gdn_layer.resolve_backend, gdn_layer.gdn_mixer)
    hopper_guard.ensure_fla_gdn_backward_allowed = lambda *a, **kw: calls.append((*a[:3], kw))
    gdn_layer.resolve_backend = lambda b, dev: backend["name"]
    # stand-in for the fla mixer (CPU): the right output shape, from the projection
    gdn_layer.gdn_mixer = lambda proj, *a, **kw: proj[..., :mixer.value_dim // (tp * cp)]
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


@pytest.mark.parametrize("tp, cp", [(2, 1), (1, 2)], ids=["tp2", "cp2"])
def test_layer_applies_hopper_policy_before_fla_training_forward(tp, cp):
    """The heads this GPU runs: H / (TP x CP) and HV / (TP x CP) (CP runs 1/CP of the heads)."""
    cfg = preset_config("tiny", vocab_size=512)
    for calls in run_distributed(_worker, tp * cp, tp, cp, tp=tp):
        n = tp * cp
        assert calls == [(cfg.linear_key_head_dim, cfg.linear_value_head_dim, torch.float32,
                          {"H": cfg.linear_num_key_heads // n, "HV": cfg.linear_num_value_heads // n})]
