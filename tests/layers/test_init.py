"""Initialisation (docs/model.md §5): the distributions, and the same model at TP=1 and TP=2 for one seed."""
from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state as ps

from megatron_hybrid.config import preset_config
from megatron_hybrid.hf.mapping import is_tp_sharded, tp_merge
from megatron_hybrid.model import OlmoHybridModel
from tests.dist import run_distributed

CFG = preset_config("tiny", vocab_size=512)


def _params(rank, tp):
    model = OlmoHybridModel(CFG, CFG.to_transformer_config(tp, 1))
    return {"tp_rank": ps.get_tensor_model_parallel_rank(),
            "params": {k: p.detach().clone() for k, p in model.named_parameters()}}


def _merged(tp):
    outs = sorted(run_distributed(_params, tp, tp, tp=tp), key=lambda o: o["tp_rank"])
    names = outs[0]["params"]
    merged = {}
    for n in names:
        shards = [o["params"][n] for o in outs]
        if is_tp_sharded(n, CFG):
            merged[n] = tp_merge(n, shards, CFG)
        else:
            assert all(torch.equal(s, shards[0]) for s in shards), f"{n} differs across TP ranks"
            merged[n] = shards[0]
    return merged


@pytest.fixture(scope="module")
def tp1():
    return _merged(1)


def test_distributions_follow_spec(tp1):
    std = CFG.init_method_std
    for name, p in tp1.items():
        if name.endswith(("layernorm.weight", "norm.weight")):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("A_log"):
            a = p.exp()
            assert (a > 0).all() and (a <= 16).all(), name
        elif name.endswith("dt_bias"):
            dt = torch.nn.functional.softplus(p.double())
            assert (dt >= 1e-4 * (1 - 1e-6)).all() and (dt <= 0.1 * (1 + 1e-6)).all(), name
        else:  # linear weights, embeddings, convs: truncated normal, std 0.02, cut at 3 std
            assert p.abs().max() <= 3 * std + 1e-7, name
            if p.numel() >= 4096:
                # std of N(0, s) truncated at +-3s is 0.9866 s
                assert abs(p.std().item() / (0.9866 * std) - 1) < 0.05, (name, p.std().item())


@pytest.mark.distributed
def test_tp2_initialises_the_same_model_as_tp1(tp1):
    tp2 = _merged(2)
    assert set(tp1) == set(tp2)
    differ = [n for n in tp1 if not torch.equal(tp1[n], tp2[n])]
    assert not differ, differ
