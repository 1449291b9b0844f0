"""Layers under tensor parallelism (gloo, 2 processes): TP=2 equals TP=1 for outputs and gradients
with and without sequence parallelism; the full-width QK-norm is exact under TP; replicated
parameters stay identical across TP ranks through optimizer steps (docs/megatron_core_notes.md §5 E)."""
from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_hybrid.forward import forward_backward_loss
from megatron_hybrid.layers.norms import TPFullWidthRMSNorm
from tests.dist import run_distributed
from tests.model_utils import build_loaded_model, merge_grads, rank_grads, reference_setup

pytestmark = pytest.mark.distributed


def _data(cfg, B=2, T=40):
    g = torch.Generator().manual_seed(5)
    return (torch.randint(0, cfg.vocab_size, (B, T), generator=g),
            torch.randint(0, cfg.vocab_size, (B, T), generator=g))


def _grad_worker(rank, variation, tp, sp):
    # fp64 model (megatron computes the cross-entropy in fp32, hence 1e-6 below)
    # fp64, so that the comparison is not limited by fp32 summation-order noise
    _, cfg, weights = reference_setup(variation)
    ids, labels = _data(cfg)
    model = build_loaded_model(cfg, {k: v.double() for k, v in weights.items()}, tp, 1, sp,
                               params_dtype=torch.float64)
    loss = forward_backward_loss(model, ids, labels)
    return {"loss": loss, "grads": rank_grads(model)}


@pytest.mark.parametrize("variation,sp", [("base", False), ("base", True),
                                          ("grouped_values", True), ("gqa", False)])
def test_tp2_equals_tp1_outputs_and_gradients(variation, sp):
    _, cfg, _ = reference_setup(variation)
    ref = run_distributed(_grad_worker, 1, variation, 1, False)[0]
    got = run_distributed(_grad_worker, 2, variation, 2, sp, tp=2)
    for r in got:
        assert abs(r["loss"] - ref["loss"]) <= 1e-6 * abs(ref["loss"]), (r["loss"], ref["loss"])
    g_ref = merge_grads([ref["grads"]], cfg)
    g_tp = merge_grads([r["grads"] for r in got], cfg)
    assert set(g_ref) == set(g_tp)
    worst = 0.0
    for name in g_ref:
        rel = ((g_tp[name] - g_ref[name]).norm() / g_ref[name].norm()).item()
        worst = max(worst, rel)
        assert rel <= 1e-6, f"{name}: TP=2 (SP={sp}) vs TP=1 gradient rel. difference {rel:.2e}"
    print(f"[tp] {variation} SP={sp}: loss {ref['loss']:.6f}, worst grad rel diff {worst:.2e}")
    if not sp:  # replicated grads must agree across ranks without any reduction
        for name, e in got[0]["grads"].items():
            other = got[1]["grads"][name]
            if "norm" in name and not name.endswith(("q_layernorm.weight", "k_layernorm.weight")):
                assert torch.equal(e["grad"], other["grad"]), name


def _qk_norm_worker(rank, x, w, gy, eps):
    from megatron_hybrid.config import OlmoHybridConfig

    tp = ps.get_tensor_model_parallel_world_size()
    r = ps.get_tensor_model_parallel_rank()
    width = x.shape[-1]
    cfg = OlmoHybridConfig(num_layers=1, hidden_size=width, ffn_hidden_size=64,
                           num_attention_heads=4, vocab_size=128, hybrid_layer_pattern="*-")
    norm = TPFullWidthRMSNorm(cfg.to_transformer_config(tp, 1), width, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(w.chunk(tp)[r])
    xl = x.chunk(tp, dim=-1)[r].clone().requires_grad_(True)
    y = norm(xl)
    y.backward(gy.chunk(tp, dim=-1)[r])
    return y.detach(), xl.grad, norm.weight.grad


def test_full_width_qk_norm_tp2_equals_fp64_reference():
    torch.manual_seed(0)
    S, B, W, eps = 5, 3, 32, 1e-6
    x, w, gy = torch.randn(S, B, W), 1 + 0.1 * torch.randn(W), torch.randn(S, B, W)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
    y64.backward(gy.double())
    for tp in (1, 2):
        outs = run_distributed(_qk_norm_worker, tp, x, w, gy, eps, tp=tp)
        y = torch.cat([o[0] for o in outs], -1)
        gx = torch.cat([o[1] for o in outs], -1)
        gw = torch.cat([o[2] for o in outs], -1)
        for name, a, b in (("y", y, y64), ("dx", gx, x64.grad), ("dw", gw, w64.grad)):
            rel = ((a.double() - b).norm() / b.norm()).item()
            assert rel <= 1e-6, f"TP={tp} {name}: rel. error {rel:.2e}"


def _steps_worker(rank, variation, steps):
    _, cfg, weights = reference_setup(variation)
    model = build_loaded_model(cfg, weights, 2, 1, False)
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=False), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1,
                                                 bf16=False, clip_grad=1.0), [ddp])
    g = torch.Generator().manual_seed(11)
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        forward_backward_loss(ddp, ids, torch.roll(ids, -1, 1))
        ok, _, _ = opt.step()
        assert ok
    out = {}
    for name, p in model.named_parameters():
        if not getattr(p, "tensor_model_parallel", False):
            out[name] = p.detach().clone()
    return out, {k: v for k, v in weights.items()}


def test_replicated_parameters_identical_across_tp_after_steps_without_sp():
    outs = run_distributed(_steps_worker, 2, "base", 3, tp=2)
    (p0, init), (p1, _) = outs
    names = [n for n in p0 if "norm" in n]
    assert any("out_norm" in n for n in names) and len(names) > 5
    changed = 0
    for name in p0:
        assert torch.equal(p0[name], p1[name]), f"{name} drifted between TP ranks"
        # one pipeline stage: local parameter names are the global ones
        if name in init and not torch.equal(p0[name], init[name].to(p0[name].dtype)):
            changed += 1
    assert changed == len(p0), "some replicated parameters were not updated by the optimizer"
