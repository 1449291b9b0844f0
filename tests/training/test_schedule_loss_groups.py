"""LR schedule, z-loss, weight-decay groups, FLOPs and flag validation of the training job."""
from __future__ import annotations

import math

import megatron.core.parallel_state as ps
import pytest
import torch

from megatron_hybrid.config import preset_config
from megatron_hybrid.config.arguments import ArgumentError, model_config_from_args, parse_args
from megatron_hybrid.model_setup import build_scheduler, setup_model_and_optimizer
from megatron_hybrid.training.flops import matmul_params, training_flops_per_token
from megatron_hybrid.training.loss import lm_loss_with_z_loss
from tests.dist import run_distributed

BASE = ["--seq-length", "16", "--train-iters", "10", "--lr", "1e-3", "--mock-data",
        "--vocab-size", "200"]


class _FakeOptimizer:
    def __init__(self):
        self.param_groups = [{"wd_mult": 1.0}, {"wd_mult": 0.0}]


def _expected_lr(i, style, lr, min_lr, warmup, decay, init=0.0):
    """Closed form (Megatron's definition): linear warmup, then decay to min_lr at `decay`."""
    if warmup > 0 and i <= warmup:
        return init + (lr - init) * i / warmup
    if style == "constant":
        return lr
    if i > decay:
        return min_lr
    ratio = (i - warmup) / (decay - warmup)
    coeff = 1 - ratio if style == "linear" else 0.5 * (1 + math.cos(math.pi * ratio))
    return min_lr + coeff * (lr - min_lr)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_lr_schedule_matches_closed_form(style):
    args = parse_args(BASE + ["--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", style,
                              "--lr-warmup-iters", "4", "--train-iters", "20",
                              "--weight-decay", "0.1"], world_size=1)
    opt = _FakeOptimizer()
    sched = build_scheduler(args, opt)
    for i in range(0, 25):
        want = _expected_lr(i, style, 3e-4, 3e-5, 4, 20)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), i
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.1)
        assert opt.param_groups[1]["weight_decay"] == 0.0
        sched.step(increment=1)


def test_lr_warmup_fraction_and_errors():
    args = parse_args(BASE + ["--lr-warmup-fraction", "0.2", "--train-iters", "50"], world_size=1)
    assert args.lr_warmup_iters == 10 and args.lr_decay_iters == 50
    with pytest.raises(ArgumentError, match="--lr-warmup-iters"):
        parse_args(BASE + ["--lr-warmup-iters", "10"], world_size=1)
    with pytest.raises(ArgumentError, match="--global-batch-size 6 is not divisible"):
        parse_args(BASE + ["--micro-batch-size", "4", "--global-batch-size", "6"], world_size=1)
    with pytest.raises(ArgumentError, match="--tensor-model-parallel-size 2"):
        parse_args(BASE + ["--tensor-model-parallel-size", "2"], world_size=3)
    args = parse_args(BASE + ["--micro-batch-size", "2", "--global-batch-size", "8",
                              "--tensor-model-parallel-size", "2"], world_size=4)
    assert (args.data_parallel_size, args.num_microbatches) == (2, 2)


def test_model_flags_override_preset():
    args = parse_args(BASE + ["--model-preset", "tiny", "--num-layers", "4", "--hidden-size",
                              "128"], world_size=1)
    cfg = model_config_from_args(args, vocab_size=1000, eos_token_id=999)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (4, 128, 704)
    assert cfg.hybrid_layer_pattern == "G-G-G-*-"
    assert cfg.padded_vocab_size == 1024 and cfg.eos_token_id == 999
    args = parse_args(BASE + ["--model-preset", "tiny", "--linear-attention-freq", "2"],
                      world_size=1)
    assert model_config_from_args(args, 1000).hybrid_layer_pattern == "G-*-" * 4


def test_flops_match_spec_section_10():
    cfg = preset_config("olmo_hybrid_7b")
    assert sum(matmul_params(cfg).values()) == 7_044_096_000
    got = [training_flops_per_token(cfg, s) / 1e9 for s in (4096, 8192, 16384, 32768, 65536)]
    assert [round(g, 1) for g in got] == [43.5, 44.2, 45.7, 48.7, 54.8]


def _reference_losses(logits, labels, mask, w):
    x = logits.double()
    lse = torch.logsumexp(x, dim=-1)
    ce = lse - x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    n = mask.sum()
    lm, z = (ce * mask).sum() / n, (lse.square() * mask).sum() / n
    return lm + w * z, lm, z


def _z_loss_single_worker(rank):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 64, generator=gen) * 4).requires_grad_()
    labels = torch.randint(0, 64, (2, 7), generator=gen)
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    before = logits.detach().clone()
    total, lm, z = lm_loss_with_z_loss(logits, labels, mask, 1e-2)
    total.backward()
    return before, logits.detach(), labels, mask, float(lm), float(z), logits.grad


@pytest.mark.distributed
def test_z_loss_value_and_gradient():
    # In-process megatron state would be inherited by later forked tests: run in a worker.
    before, after, labels, mask, lm, z, grad = run_distributed(_z_loss_single_worker, 1)[0]
    assert torch.equal(before, after), "the loss must not modify the caller's logits"
    ref_logits = before.double().requires_grad_()
    ref_total, ref_lm, ref_z = _reference_losses(ref_logits, labels, mask.double(), 1e-2)
    assert lm == pytest.approx(float(ref_lm), rel=1e-6)
    assert z == pytest.approx(float(ref_z), rel=1e-6)
    ref_total.backward()
    torch.testing.assert_close(grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-7)


def _z_loss_tp_worker(rank, logits, labels, mask):
    tp_rank = ps.get_tensor_model_parallel_rank()
    v = logits.shape[-1] // 2
    local = logits[..., tp_rank * v:(tp_rank + 1) * v].clone().requires_grad_()
    total, lm, z = lm_loss_with_z_loss(local, labels, mask, 0.5)
    total.backward()
    return float(total), float(lm), float(z), local.grad


@pytest.mark.distributed
def test_z_loss_tensor_parallel_equals_full():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 32, generator=gen) * 3
    labels = torch.randint(0, 32, (2, 5), generator=gen)
    mask = torch.ones(2, 5)
    out = run_distributed(_z_loss_tp_worker, 2, logits, labels, mask, tp=2)
    full = logits.double().requires_grad_()
    ref = _reference_losses(full, labels, mask.double(), 0.5)
    ref[0].backward()
    for rank, (total, lm, z, grad) in enumerate(out):
        assert total == pytest.approx(float(ref[0]), rel=1e-6)
        assert (lm, z) == (pytest.approx(float(ref[1]), rel=1e-6),
                           pytest.approx(float(ref[2]), rel=1e-6))
        torch.testing.assert_close(grad.double(), full.grad[..., rank * 16:(rank + 1) * 16],
                                   rtol=1e-5, atol=1e-7)


def _decay_groups_worker(rank, grouping):
    args = parse_args(BASE + ["--model-preset", "tiny", "--num-layers", "4",
                              "--weight-decay-grouping", grouping], world_size=1)
    cfg = model_config_from_args(args, vocab_size=200)
    setup = setup_model_and_optimizer(args, cfg, torch.device("cpu"))
    params = dict(setup.unwrapped.named_parameters())
    names = {id(p): n for n, p in params.items()}
    decay = {}
    for group in setup.optimizer.param_groups:
        for p in group["params"]:
            decay[names[id(p)]] = group["wd_mult"]
    return decay, {n: p.dim() for n, p in params.items()}


@pytest.mark.distributed
@pytest.mark.parametrize("grouping", ["olmo", "megatron"])
def test_weight_decay_groups(grouping):
    decay, dims = run_distributed(_decay_groups_worker, 1, grouping)[0]
    assert set(decay) == set(dims)
    if grouping == "olmo":  # docs/model.md §8: everything but the embedding is decayed
        assert {n for n, m in decay.items() if m == 0.0} == {"embedding.word_embeddings.weight"}
        for n in ("output_layer.weight", "decoder.final_layernorm.weight",
                  "decoder.layers.0.self_attention.A_log",
                  "decoder.layers.0.self_attention.dt_bias",
                  "decoder.layers.0.self_attention.conv1d.weight"):
            assert decay[n] == 1.0, n
    else:  # megatron-core's default: no decay on 1-D parameters and biases
        for n, m in decay.items():
            assert m == (0.0 if dims[n] == 1 else 1.0), n


def _bf16_loss_worker(rank):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 11, 96, generator=gen) * 5).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 96, (3, 11), generator=gen)
    mask = torch.ones(3, 11)
    total, lm, z = lm_loss_with_z_loss(logits, labels, mask, 1e-3)
    total.backward()
    return logits.detach(), labels, mask, float(total), logits.grad


@pytest.mark.distributed
def test_bf16_logits_give_fp32_losses_and_a_bf16_gradient():
    logits, labels, mask, total, grad = run_distributed(_bf16_loss_worker, 1)[0]
    ref_logits = logits.double().requires_grad_()
    ref_total, _, _ = _reference_losses(ref_logits, labels, mask.double(), 1e-3)
    ref_total.backward()
    assert total == pytest.approx(float(ref_total), rel=1e-6)  # fp32 math on the bf16 values
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), ref_logits.grad, rtol=1e-2, atol=1e-4)
