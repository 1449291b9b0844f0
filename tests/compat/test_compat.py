"""Tests of megatron_hybrid.compat, megatron_hybrid.parallel and the fork runner tests/dist.py.

Single-process tests check each patch of docs/megatron_core_notes.md §2; `distributed` tests run
megatron-core's local-spec GPTModel over gloo and compare layouts against TP1/PP1 runs made in the
same workers (values computed, never hard-coded).
"""
from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.fusions import fused_softmax
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.utils import attention_mask_func

from megatron_hybrid.checkpoint.storage import ensure_checkpoint_dir
from megatron_hybrid.compat import CPU_PATCHES, apply_compat, compat_status
from megatron_hybrid.compat import torch_norm as compat_torch_norm
from megatron_hybrid.compat.cpu import CudaToCpuMode
from megatron_hybrid.compat.rng import CPURNGStatesTracker
from megatron_hybrid.parallel import initialize_distributed
from tests.dist import run_distributed

pytestmark = pytest.mark.usefixtures("compat")
needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only patches")
CUDA_DEVICES = ["cuda", "cuda:1", 0, 1, torch.device("cuda"), torch.device("cuda", 1)]


# ---------------------------------------------------------------- apply_compat / status
@needs_cpu
def test_apply_compat_is_idempotent():
    tracker = tensor_parallel.get_cuda_rng_tracker()
    first, second = apply_compat(), apply_compat()
    assert first == second == compat_status()
    assert all(first[name] for name in CPU_PATCHES) and first["torch_norm"]
    assert not first["cuda_available"]
    modes = torch.overrides._get_current_function_mode_stack()
    assert sum(isinstance(m, CudaToCpuMode) for m in modes) == 1
    assert tensor_parallel.get_cuda_rng_tracker() is tracker


@needs_cpu
def test_device_mode_is_per_thread():
    seen = {}

    def worker():
        seen["before"] = compat_status()["device_mode"]
        seen["after"] = apply_compat()["device_mode"]
        seen["device"] = torch.zeros(1, device="cuda").device.type

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"before": False, "after": True, "device": "cpu"}


# ---------------------------------------------------------------- devices (#2, #5, #6, #7)
@needs_cpu
@pytest.mark.parametrize("device", CUDA_DEVICES, ids=str)
def test_cuda_devices_map_to_cpu(device):
    assert torch.ones(2, device=device).device.type == "cpu"
    assert torch.arange(3, device=device).device.type == "cpu"
    assert torch.tensor([1.0], device=device).device.type == "cpu"
    x = torch.randn(3)
    assert x.new_zeros(2, device=device).device.type == "cpu"
    for moved in (x.to(device), x.to(device, torch.float64), x.to(device=device)):
        assert moved.device.type == "cpu" and torch.equal(moved.float(), x)
    assert x.to(device, torch.float16).dtype == torch.float16


@needs_cpu
def test_cuda_helpers_and_tensor_cuda():
    x = torch.randn(3)
    assert x.cuda() is x and x.cuda(1, non_blocking=True) is x
    assert torch.Tensor.cuda(x) is x
    assert x.to(torch.float16).dtype == torch.float16  # dtype-only calls untouched
    module = torch.nn.Linear(2, 2).cuda()
    assert module.weight.device.type == "cpu"
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.cuda.synchronize() is None


@needs_cpu
def test_cuda_calls_inside_backward():
    """The mode is off inside autograd backward; .cuda() and current_device must still work."""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            extra = torch.zeros(grad.shape, device=torch.cuda.current_device())
            return grad.cuda() * 2 + extra

    x = torch.randn(4, requires_grad=True)
    Fn.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((4,), 2.0))


@needs_cpu
@pytest.mark.parametrize("dtype,name", [
    (torch.float32, "FloatTensor"), (torch.float16, "HalfTensor"),
    (torch.bfloat16, "BFloat16Tensor"), (torch.int64, "LongTensor"),
])
def test_tensor_type_reports_cuda(dtype, name):
    x = torch.zeros(2, dtype=dtype)
    assert x.type() == f"torch.cuda.{name}"
    assert torch.nn.Parameter(torch.zeros(2)).type() == "torch.cuda.FloatTensor"
    converted = x.type(torch.float64)  # the converting form is untouched
    assert converted.dtype == torch.float64 and converted.device.type == "cpu"


# ---------------------------------------------------------------- causal masks (#3)
@needs_cpu
def test_default_causal_mask_on_cpu():
    mask = fused_softmax.get_default_causal_mask(5)
    i, j = torch.arange(5)[:, None], torch.arange(5)[None, :]
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, j > i)


@needs_cpu
def test_sliding_window_mask_on_cpu():
    sq, skv, (left, right) = 4, 6, (2, 0)
    mask = fused_softmax.get_sliding_window_causal_mask(sq, skv, (left, right))
    pos = torch.arange(sq)[:, None] + (skv - sq)  # absolute position of each query
    key = torch.arange(skv)[None, :]
    visible = (key <= pos + right) & (key >= pos - left)
    assert mask.device.type == "cpu" and torch.equal(mask, ~visible)


@needs_cpu
def test_fused_softmax_causal_without_mask():
    softmax = fused_softmax.FusedScaleMaskSoftmax(
        False, False, AttnMaskType.causal, False, attention_mask_func, True, None
    )
    scores = torch.randn(2, 3, 5, 5)
    expected = torch.softmax(scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf")), -1)
    torch.testing.assert_close(softmax(scores, None), expected)


# ---------------------------------------------------------------- RNG tracker (#1)
def _seed_tracker(seed, tp_rank):
    tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
    return tensor_parallel.get_cuda_rng_tracker()


@needs_cpu
@pytest.mark.parametrize("tp_rank", [0, 1])
def test_rng_tracker_streams_follow_megatron_seeds(tp_rank):
    tracker = _seed_tracker(123, tp_rank)
    assert isinstance(tracker, CPURNGStatesTracker)
    base = type(tracker).__mro__[1]  # megatron's class, so its isinstance checks pass
    assert (base.__module__, base.__name__) == (mrandom.__name__, "CudaRNGStatesTracker")
    assert mrandom.get_all_rng_states() is tracker.states_
    torch.manual_seed(7)
    with tracker.fork():
        first = torch.rand(5)
    outside = torch.rand(3)
    with tracker.fork():
        second = torch.rand(5)
    with tracker.fork(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME):
        data_parallel = torch.rand(2)
    expected = torch.Generator().manual_seed(123 + 2718 + tp_rank)  # Megatron's TP seed
    assert torch.equal(first, torch.rand(5, generator=expected))
    assert torch.equal(second, torch.rand(5, generator=expected))  # the stream continues
    assert torch.equal(outside, torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(data_parallel, torch.rand(2, generator=torch.Generator().manual_seed(123)))


@needs_cpu
def test_rng_tracker_differs_per_tp_rank_and_reproduces():
    draws = {}
    for tp_rank in (0, 1, 0):
        with _seed_tracker(5, tp_rank).fork():
            draws.setdefault(tp_rank, []).append(torch.rand(4))
    assert torch.equal(draws[0][0], draws[0][1])
    assert not torch.equal(draws[0][0], draws[1][0])
    with pytest.raises(Exception, match="is not added"):
        with tensor_parallel.get_cuda_rng_tracker().fork("no-such-stream"):
            pass
    tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0,
                                                     force_reset_rng=True)
    assert isinstance(tensor_parallel.get_cuda_rng_tracker(), CPURNGStatesTracker)


@needs_cpu
def test_checkpoint_recompute_replays_rng():
    w = torch.randn(8, 8, requires_grad=True)

    def block(x):
        h = x @ w
        with tensor_parallel.get_cuda_rng_tracker().fork():
            h = F.dropout(h, 0.5, training=True)
        h = F.dropout(torch.tanh(h), 0.3, training=True).cuda()
        mask = fused_softmax.get_default_causal_mask(h.shape[0])  # re-run inside backward
        return h.masked_fill(mask[:, : h.shape[1]], 0.0) * torch.ones(1, device="cuda")

    def run(use_checkpoint):
        _seed_tracker(99, 0)
        torch.manual_seed(11)
        w.grad = None
        x = torch.randn(8, 8, requires_grad=True)
        out = tensor_parallel.checkpoint(block, False, x) if use_checkpoint else block(x)
        out.square().sum().backward()
        with tensor_parallel.get_cuda_rng_tracker().fork():
            after_tp = torch.rand(2)
        return out.detach(), x.grad, w.grad.clone(), torch.rand(2), after_tp

    for plain, ckpt in zip(run(False), run(True), strict=True):
        assert torch.equal(plain, ckpt)


# ---------------------------------------------------------------- torch norm (#4), ckpt dir (#8)
@pytest.mark.parametrize("normalization,cls", [("RMSNorm", torch.nn.RMSNorm),
                                               ("LayerNorm", torch.nn.LayerNorm)])
@pytest.mark.parametrize("sp", [True, False])
def test_wrapped_torch_norm_sequence_parallel(normalization, cls, sp):
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                               normalization=normalization, sequence_parallel=sp,
                               tensor_model_parallel_size=2)
    norm = WrappedTorchNorm(config=config, hidden_size=16, eps=1e-6)
    assert type(norm) is cls and norm.eps == 1e-6
    params = list(norm.parameters())
    assert params and all(p.sequence_parallel is sp for p in params)
    if sp:  # megatron's own __new__ refuses it: the patch is needed
        with pytest.raises(AssertionError, match="sequence parallel"):
            compat_torch_norm._ORIG_NEW(WrappedTorchNorm, config=config, hidden_size=16)


def test_ensure_checkpoint_dir_single_process(tmp_path):
    target = tmp_path / "a" / "b"
    assert ensure_checkpoint_dir(target) == str(target) and target.is_dir()
    assert ensure_checkpoint_dir(target) == str(target)  # exists: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        ensure_checkpoint_dir(tmp_path / "file")


def _ckpt_dir_worker(rank, path):
    return ensure_checkpoint_dir(path) == path and os.path.isdir(path)


@pytest.mark.distributed
def test_ensure_checkpoint_dir_distributed(tmp_path):
    path = str(tmp_path / "ckpt" / "iter_0000001")
    assert run_distributed(_ckpt_dir_worker, 2, path) == [True, True]


# ---------------------------------------------------------------- GPT end to end over gloo
def _tp_worker(rank, gpt, sp):
    losses_tp2 = gpt.forward_backward(gpt.build(gpt.config(tp=2, sp=sp)), gpt.batches())
    initialize_distributed(1, 1)  # same workers, TP1 (DP2), reseeded
    losses_tp1 = gpt.forward_backward(gpt.build(gpt.config()), gpt.batches())
    return losses_tp2, losses_tp1


@pytest.mark.distributed
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_gpt_tp2_matches_tp1(gpt, sp):
    for losses_tp2, losses_tp1 in run_distributed(_tp_worker, 2, gpt, sp, tp=2):
        assert len(losses_tp2) == 2
        torch.testing.assert_close(losses_tp2, losses_tp1, rtol=1e-5, atol=1e-6)


def _pp_worker(rank, gpt):
    full = gpt.build(gpt.config())
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in full.state_dict().items()}
    losses_pp1 = gpt.forward_backward(full, gpt.batches())
    grads_pp1 = {n: p.grad.clone() for n, p in full.named_parameters()}
    initialize_distributed(1, 2)
    config = gpt.config(pp=2)
    stage = gpt.build(config)
    stage.load_state_dict(gpt.stage_state_dict(state, config), strict=True)
    losses_pp2 = gpt.forward_backward(stage, gpt.batches())
    expected = gpt.stage_state_dict(grads_pp1, config)
    grads_ok = all(torch.allclose(p.grad, expected[n], rtol=1e-4, atol=1e-6)
                   for n, p in stage.named_parameters())
    return losses_pp1, losses_pp2, grads_ok, ps.is_pipeline_last_stage()


@pytest.mark.distributed
def test_gpt_pp2_matches_pp1(gpt):
    results = run_distributed(_pp_worker, 2, gpt, pp=1)
    assert [r[3] for r in results] == [False, True]
    assert all(r[2] for r in results)  # every stage's grads equal the PP1 grads
    assert results[0][1] == []  # only the last stage reports losses
    losses_pp1, losses_pp2 = results[1][0], results[1][1]
    torch.testing.assert_close(losses_pp2, losses_pp1, rtol=1e-5, atol=1e-6)


def _ddp_worker(rank, gpt):
    losses_tp2, norms_tp2, model = gpt.train(gpt.config(tp=2, sp=True))
    replicated = {n: p.detach().clone() for n, p in model.named_parameters()
                  if not getattr(p, "tensor_model_parallel", False)}
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, replicated,
                                        group=ps.get_tensor_model_parallel_group())
    in_sync = all(torch.equal(gathered[0][n], gathered[1][n]) for n in replicated)
    initialize_distributed(1, 1)
    losses_tp1, norms_tp1, _ = gpt.train(gpt.config())
    return losses_tp2, norms_tp2, losses_tp1, norms_tp1, in_sync, len(replicated)


@pytest.mark.distributed
def test_gpt_ddp_distributed_optimizer_tp2(gpt):
    """DDP + distributed Adam at TP2+SP (3 steps) equals TP1 (DP2) with the same data and seed."""
    for losses_tp2, norms_tp2, losses_tp1, norms_tp1, in_sync, n_replicated in run_distributed(
        _ddp_worker, 2, gpt, tp=2
    ):
        assert n_replicated > 0 and in_sync  # SP norm grads summed over TP: replicas agree
        assert losses_tp2[-1] != losses_tp2[0]  # the optimizer moved the weights
        torch.testing.assert_close(losses_tp2, losses_tp1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norms_tp2, norms_tp1, rtol=1e-4, atol=1e-5)


def _recompute_worker(rank, gpt):
    results = []
    for extra in ({}, dict(recompute_granularity="full", recompute_method="uniform",
                           recompute_num_layers=1)):
        torch.manual_seed(4321)
        tensor_parallel.model_parallel_cuda_manual_seed(4321)
        config = gpt.config(tp=2, sp=True, hidden_dropout=0.2, attention_dropout=0.2, **extra)
        model = gpt.build(config)
        losses = gpt.forward_backward(model, gpt.batches())
        results.append((losses, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (losses_plain, grads_plain), (losses_recompute, grads_recompute) = results
    same_grads = all(torch.equal(grads_plain[n], grads_recompute[n]) for n in grads_plain)
    return losses_plain, losses_recompute, same_grads


@pytest.mark.distributed
def test_gpt_full_recompute_with_dropout_tp2_sp(gpt):
    """Full recompute replays dropout (default and TP-rank streams) exactly, at TP2+SP."""
    for losses_plain, losses_recompute, same_grads in run_distributed(_recompute_worker, 2, gpt,
                                                                      tp=2):
        assert losses_plain == losses_recompute and same_grads
