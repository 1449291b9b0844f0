"""Logits of the Megatron model equal HF ``OlmoHybridForCausalLM`` on the same weights (docs/model.md §12),
at TP=1/PP=1 for every variation and at TP=2 x PP=2; PP=2 loss and gradients equal PP=1."""
from __future__ import annotations

import pytest
import torch

from megatron_hybrid.forward import forward_backward_loss, forward_logits
from tests.dist import run_distributed
from tests.hf_models import VARIATIONS, hf_logits
from tests.model_utils import build_loaded_model, merge_grads, rank_grads, reference_setup

TOL = 1e-5  # max |dlogits| in fp32 (issue acceptance)


def _ids(cfg, B=2, T=70, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


def _logits_worker(rank, variation, ids, tp, pp, sp):
    _, cfg, weights = reference_setup(variation)
    model = build_loaded_model(cfg, weights, tp, pp, sp)
    out = forward_logits(model, ids, vocab_size=cfg.vocab_size)
    return None if out is None else out


def _check(variation, tp=1, pp=1, sp=False, T=70, B=2):
    hf, cfg, _ = reference_setup(variation)
    ids = _ids(cfg, B, T)
    ref = hf_logits(hf, ids)
    outs = run_distributed(_logits_worker, tp * pp, variation, ids, tp, pp, sp, tp=tp, pp=pp)
    got = [o for o in outs if o is not None]
    assert got, "no rank returned logits"
    for out in got:  # every TP rank of the last stage holds the gathered logits
        assert out.shape == ref.shape
        err = (out - ref).abs().max().item()
        print(f"[parity] {variation} TP={tp} PP={pp} SP={sp} T={T}: max|dlogits| = {err:.3e} "
              f"(|logits| max {ref.abs().max():.2f})")
        assert err <= TOL, f"{variation} TP={tp} PP={pp}: max |dlogits| {err:.3e} > {TOL}"


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_logits_match_hf(variation):
    _check(variation)


@pytest.mark.parametrize("T", [1, 3, 64, 129])
def test_logits_match_hf_sequence_lengths(T):
    _check("base", T=T, B=3)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("variation", ["base", "tied", "grouped_values"])
def test_logits_match_hf_tp2_pp2(variation):
    _check(variation, tp=2, pp=2, sp=variation == "base")


@pytest.mark.distributed
def test_logits_match_hf_tp2_sequence_parallel():
    _check("gqa", tp=2, pp=1, sp=True)


def _grad_worker(rank, variation, ids, labels, pp, mbs):
    _, cfg, weights = reference_setup(variation)
    model = build_loaded_model(cfg, weights, 1, pp)
    loss = forward_backward_loss(model, ids, labels, micro_batch_size=mbs)
    return {"loss": loss, "grads": rank_grads(model)}


@pytest.mark.distributed
@pytest.mark.parametrize("variation", ["base", "tied"])
def test_pp2_loss_and_grads_equal_pp1(variation):
    _, cfg, _ = reference_setup(variation)
    ids, labels = _ids(cfg, 4, 33, seed=2), _ids(cfg, 4, 33, seed=3)
    ref = run_distributed(_grad_worker, 1, variation, ids, labels, 1, 2)
    got = run_distributed(_grad_worker, 2, variation, ids, labels, 2, 2, pp=2)
    loss_ref = ref[0]["loss"]
    loss_pp = [r["loss"] for r in got if r["loss"] is not None][0]
    assert abs(loss_pp - loss_ref) <= 1e-6 * abs(loss_ref), (loss_pp, loss_ref)
    g_ref = merge_grads([ref[0]["grads"]], cfg)
    g_pp = merge_grads([r["grads"] for r in got], cfg)
    assert set(g_ref) == set(g_pp)
    for name in g_ref:
        rel = ((g_pp[name] - g_ref[name]).norm() / g_ref[name].norm()).item()
        assert rel <= 1e-5, f"{name}: relative gradient difference {rel:.2e}"
