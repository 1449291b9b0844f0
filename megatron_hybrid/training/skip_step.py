"""Skipping bad optimizer steps: non-finite values and Olmo's loss / grad-norm spike rule.

Olmo's rule (spec ``docs/model.md`` §8; OLMo-core ``optim/skip_step_optimizer.py``): skip the
update when ``|loss - mean| / std > sigma`` or ``|grad_norm - mean| / std > sigma`` over the
previous (at most ``window``) accepted steps, once at least ``min_history`` steps were seen. A
skipped step leaves the weights and Adam moments untouched. A non-finite loss or grad norm is
always skipped. The decision is taken from values every rank shares (the global loss and grad
norm), so all ranks skip together.

``guarded_optimizer_step`` runs megatron-core's optimizer step in its own pieces
(``prepare_grads``, ``get_grad_norm``, clipping, ``step_with_ready_grads``) with the decision
between the norm and the update, so a skipped step costs no extra collective.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


class TooManySkippedSteps(RuntimeError):
    """Training stopped after too many consecutive skipped steps."""


@dataclass
class SkipDecision:
    """Whether a step is skipped, and why (``None`` when it is taken)."""

    skip: bool
    reason: str | None = None


class SkipStepRule:
    """Rolling statistics of accepted steps and the skip decision.

    Args:
        enabled: apply the spike rule (non-finite values are skipped regardless).
        sigma: threshold in standard deviations (Olmo: 6).
        window: number of previous accepted steps in the statistics (Olmo: 128).
        min_history: steps needed before the spike rule is active (Olmo: 64).
        max_consecutive: raise TooManySkippedSteps after this many skips in a row (0: never).
    """

    def __init__(self, enabled: bool = True, sigma: float = 6.0, window: int = 128,
                 min_history: int = 64, max_consecutive: int = 10):
        if sigma <= 0 or window < 2 or min_history < 2 or max_consecutive < 0:
            raise ValueError("skip-step settings: sigma > 0, window >= 2, min history >= 2, "
                             "max consecutive >= 0")
        self.enabled, self.sigma, self.min_history = enabled, sigma, min_history
        self.max_consecutive = max_consecutive
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.consecutive = 0
        self.total_skipped = 0

    @staticmethod
    def _z(value: float, history) -> float:
        n = len(history)
        mean = sum(history) / n
        var = sum((x - mean) ** 2 for x in history) / (n - 1)
        std = math.sqrt(var)
        return abs(value - mean) / std if std > 0 else (0.0 if value == mean else math.inf)

    def decide(self, loss: float, grad_norm: float) -> SkipDecision:
        """The decision for a step with this global ``loss`` and ``grad_norm`` (not recorded)."""
        if not math.isfinite(loss):
            return SkipDecision(True, f"non-finite loss {loss}")
        if not math.isfinite(grad_norm):
            return SkipDecision(True, f"non-finite grad norm {grad_norm}")
        if self.enabled and len(self.losses) >= self.min_history:
            for name, value, hist in (("loss", loss, self.losses),
                                      ("grad norm", grad_norm, self.grad_norms)):
                z = self._z(value, hist)
                if z > self.sigma:
                    return SkipDecision(True, f"{name} {value:.4g} is {z:.1f} sigma from the mean "
                                              f"of the previous {len(hist)} steps (limit "
                                              f"{self.sigma:g})")
        return SkipDecision(False)

    def record(self, loss: float, grad_norm: float, decision: SkipDecision) -> None:
        """Account for a step: accepted values join the statistics; skips are counted.

        Raises: TooManySkippedSteps after ``max_consecutive`` skips in a row.
        """
        if decision.skip:
            self.consecutive += 1
            self.total_skipped += 1
            if self.max_consecutive and self.consecutive >= self.max_consecutive:
                raise TooManySkippedSteps(
                    f"{self.consecutive} consecutive steps skipped (last: {decision.reason}); "
                    f"stopping (--max-consecutive-skipped-steps {self.max_consecutive}). Resume "
                    f"from the last checkpoint with a lower --lr or check the data")
            return
        self.consecutive = 0
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)

    def state_dict(self) -> dict:
        """Plain-Python state for checkpoints."""
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms),
                "consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        self.losses.clear()
        self.losses.extend(state.get("losses", []))
        self.grad_norms.clear()
        self.grad_norms.extend(state.get("grad_norms", []))
        self.consecutive = int(state.get("consecutive", 0))
        self.total_skipped = int(state.get("total_skipped", 0))


def _sub_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def guarded_optimizer_step(optimizer, loss: float, rule: SkipStepRule):
    """megatron-core's optimizer step with the skip decision before the update.

    Args:
        optimizer: a megatron-core ``ChainedOptimizer`` or ``MixedPrecisionOptimizer`` /
            ``FP32Optimizer``.
        loss: the global loss of this step (the same value on every rank).
    Returns: (decision, grad_norm). With ``decision.skip`` nothing was updated.
    Raises: TooManySkippedSteps (from ``rule.record``).
    """
    import torch
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    with torch.no_grad():
        found_inf = optimizer.prepare_grads()
        grad_norm = math.inf if found_inf else float(optimizer.get_grad_norm())
        decision = rule.decide(loss, grad_norm)
        if not decision.skip:
            for opt in _sub_optimizers(optimizer):
                if getattr(opt, "is_stub_optimizer", False):
                    continue
                params = opt.get_parameters()
                if params and opt.config.clip_grad > 0.0:
                    clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad,
                                                 total_norm=grad_norm)
            if not optimizer.step_with_ready_grads():
                decision = SkipDecision(True, "the optimizer reported an unsuccessful update")
    rule.record(loss, grad_norm, decision)
    return decision, grad_norm
