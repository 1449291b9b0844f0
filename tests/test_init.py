"""``megatron_hybrid.init``: the truncated normal of docs/model.md §5 (std, cut at +-3 std)."""
from __future__ import annotations

import pickle

import torch

from megatron_hybrid.init import TruncNormalInit, trunc_normal_init


def test_draws_the_truncated_normal_and_pickles():
    std = 0.02
    init = trunc_normal_init(std)
    assert isinstance(init, TruncNormalInit)
    init = pickle.loads(pickle.dumps(init))          # configs holding it must pickle
    torch.manual_seed(3)
    got = init(torch.empty(256, 512))
    torch.manual_seed(3)
    want = torch.empty(256, 512)
    torch.nn.init.trunc_normal_(want, mean=0.0, std=std, a=-3 * std, b=3 * std)
    assert torch.equal(got, want)
    assert got.abs().max() <= 3 * std
    # a normal cut at 3 sigma has std sigma * sqrt(1 - 6 phi(3) / (2 Phi(3) - 1)) = 0.9866 sigma
    assert abs(got.std().item() / std - 0.9866) < 0.01
