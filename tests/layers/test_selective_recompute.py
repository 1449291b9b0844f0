"""Selective recompute of the attention core (Megatron's ``core_attn``) changes nothing numerically."""
from __future__ import annotations

import pytest
import torch

from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.model import OlmoHybridModel
from tests.dist import run_distributed

pytestmark = pytest.mark.distributed


def _loss_and_grads(rank, recompute):
    cfg = OlmoHybridConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128,
                           num_attention_heads=4, kv_channels=16, vocab_size=96,
                           linear_key_head_dim=16, linear_value_head_dim=32)
    extra = {"recompute_granularity": "selective"} if recompute else {}
    torch.manual_seed(0)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = OlmoHybridModel(cfg, cfg.to_transformer_config(**extra))
    attn = model.decoder.layers[3].self_attention
    assert attn._recompute_core_attention is bool(recompute)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(24).expand(2, 24)
    loss = model(ids, pos, None, labels=ids).float().mean()
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_selective_recompute_matches_no_recompute():
    plain = run_distributed(_loss_and_grads, 1, False)[0]
    again = run_distributed(_loss_and_grads, 1, True)[0]
    assert plain[0] == again[0]
    for name, grad in plain[1].items():
        torch.testing.assert_close(again[1][name], grad, rtol=0, atol=0, msg=name)
