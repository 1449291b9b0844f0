"""Skip-step rule (docs/model.md §8) and the guarded optimizer step on megatron-core's distributed Adam."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from megatron_hybrid.training.skip_step import SkipStepRule, TooManySkippedSteps, guarded_optimizer_step
from tests.dist import run_distributed


def test_rule_matches_the_six_sigma_definition():
    rule = SkipStepRule(window=128, min_history=64, sigma=6.0)
    g = torch.Generator().manual_seed(0)
    losses = (3.0 + 0.1 * torch.randn(200, generator=g)).tolist()
    for i, x in enumerate(losses):
        d = rule.decide(x, 1.0 + 0.01 * i % 0.05)
        assert not d.skip
        rule.record(x, 1.0 + 0.01 * i % 0.05, d)
    hist = losses[-128:]
    mean, std = statistics.mean(hist), statistics.stdev(hist)
    just_in, just_out = mean + 5.99 * std, mean + 6.01 * std
    assert not rule.decide(just_in, 1.0).skip
    d = rule.decide(just_out, 1.0)
    assert d.skip and "loss" in d.reason and "6.0 sigma" in d.reason


def test_rule_inactive_before_min_history_but_non_finite_always_skipped():
    rule = SkipStepRule(min_history=64)
    for i in range(63):
        rule.record(1.0 + 1e-3 * i, 1.0, rule.decide(1.0 + 1e-3 * i, 1.0))
    assert not rule.decide(1e6, 1e6).skip  # 63 < 64 steps of history
    assert rule.decide(math.nan, 1.0).skip and rule.decide(1.0, math.inf).skip
    rule = SkipStepRule(enabled=False)
    assert rule.decide(float("nan"), 1.0).reason == "non-finite loss nan"


def test_consecutive_skips_stop_with_a_clear_error():
    rule = SkipStepRule(max_consecutive=3)
    for _ in range(2):
        rule.record(math.nan, 1.0, rule.decide(math.nan, 1.0))
    with pytest.raises(TooManySkippedSteps, match="3 consecutive steps skipped"):
        rule.record(math.nan, 1.0, rule.decide(math.nan, 1.0))


def _state(model, optimizer):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for i, s in enumerate(opt.optimizer.state.values()):
            moments[(id(opt), i)] = {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
    return params, moments


def _guarded_worker(rank):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from tests.gpt_kit import GPTKit

    def build():
        torch.manual_seed(0)
        config = GPTKit.config(1, 1)
        config.finalize_model_grads_func = finalize_model_grads
        model = DistributedDataParallel(config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True), module=GPTKit.build(config))
        opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-2, use_distributed_optimizer=True, clip_grad=1.0), [model])
        return model, opt

    def step(model, opt, seed, guarded=None):
        model.zero_grad_buffer()
        opt.zero_grad()
        losses = GPTKit.forward_backward(model, GPTKit.batches(seed=seed))
        loss = float(sum(losses) / len(losses)) if losses else 0.0
        if guarded is None:
            ok, norm, _ = opt.step()
            return float(norm)
        decision, norm = guarded_optimizer_step(opt, loss if guarded != "nan" else math.nan,
                                                guarded_rule)
        return decision, norm

    guarded_rule = SkipStepRule()
    a, opt_a = build()
    b, opt_b = build()
    norms_a = [step(a, opt_a, s) for s in range(3)]
    norms_b = [step(b, opt_b, s, guarded="ok")[1] for s in range(3)]
    same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    before = _state(b, opt_b)
    decision, _ = step(b, opt_b, 3, guarded="nan")
    after = _state(b, opt_b)
    untouched = all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and all(
        torch.equal(before[1][k][j], after[1][k][j]) for k in before[1] for j in before[1][k])
    return norms_a, norms_b, same, decision.skip, untouched


@pytest.mark.distributed
def test_guarded_step_equals_optimizer_step_and_a_skip_changes_nothing():
    norms_a, norms_b, same, skipped, untouched = run_distributed(_guarded_worker, 2)[0]
    assert norms_a == norms_b and same  # bit-identical to megatron-core's own step
    assert skipped and untouched  # weights, exp_avg, exp_avg_sq and step untouched
