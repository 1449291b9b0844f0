"""Fault injection for the reliability tests (never set in real runs): one hook object.

``MEGATRON_HYBRID_INJECT_FAULT`` holds comma-separated faults:

* ``nan-loss@N`` (iteration N), ``nan-loss@N+`` (N and every later iteration): the last pipeline
  stage's loss of that iteration is multiplied by NaN, so the loss and every gradient are NaN;
* ``kill-during-save@N``: the process SIGKILLs itself inside the save of iteration N, after the
  tensors are written and before ``run_config.yaml`` and the tracker (the worst moment).

Iterations count from 1 (the iteration a step produces, as in the logs). The training loop builds
one ``FaultInjector`` at start-up (a malformed value fails there, naming the variable) and hands
it to the two places a fault can happen: its forward step wraps the loss function with
``wrap_loss``, and the checkpoint writer calls ``before_checkpoint_commit``. Neither the loss
function nor the checkpoint code reads the environment.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping

ENV = "MEGATRON_HYBRID_INJECT_FAULT"
NAN_LOSS = "nan-loss"
KILL_DURING_SAVE = "kill-during-save"
FAULTS = (NAN_LOSS, KILL_DURING_SAVE)


class FaultInjector:
    """The faults of one run, ``{name: (iteration, onwards)}``; empty in real runs.

    Raises:
        ValueError: (``parse``) an item that is not ``NAME@ITERATION[+]`` or an unknown NAME,
            naming the variable and the value.
    """

    def __init__(self, faults: Mapping[str, tuple[int, bool]] | None = None):
        self.faults = dict(faults or {})

    @classmethod
    def parse(cls, spec: str) -> FaultInjector:
        out = {}
        for item in filter(None, (x.strip() for x in spec.split(","))):
            name, _, at = item.partition("@")
            try:
                iteration = int(at.rstrip("+"))
            except ValueError:
                raise ValueError(f"{ENV}={spec!r}: expected NAME@ITERATION[+], e.g. nan-loss@3") from None
            if name not in FAULTS:
                raise ValueError(f"{ENV}={spec!r}: unknown fault {name!r}; known: {', '.join(FAULTS)}")
            out[name] = (iteration, at.endswith("+"))
        return cls(out)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> FaultInjector:
        """The faults ``MEGATRON_HYBRID_INJECT_FAULT`` asks for (none when unset)."""
        return cls.parse(environ.get(ENV, "").strip())

    def fires(self, name: str, iteration: int) -> bool:
        """Whether fault ``name`` fires at ``iteration``."""
        fault = self.faults.get(name)
        if fault is None:
            return False
        at, onwards = fault
        return iteration == at or (onwards and iteration >= at)

    def wrap_loss(self, loss_func: Callable, iteration: int) -> Callable:
        """``loss_func`` itself, or (``nan-loss`` at ``iteration``) one whose loss and reported lm
        loss are NaN. ``loss_func(output) -> (loss, {"lm loss": ..., ...})`` (Megatron's form)."""
        if not self.fires(NAN_LOSS, iteration):
            return loss_func

        def nan_loss(output_tensor):
            total, report = loss_func(output_tensor)
            return total * float("nan"), {**report, "lm loss": report["lm loss"] * float("nan")}

        return nan_loss

    def before_checkpoint_commit(self, iteration: int) -> None:
        """Called by the checkpoint writer between the tensors and the metadata of a save:
        SIGKILL this process when ``kill-during-save`` fires at ``iteration``."""
        if self.fires(KILL_DURING_SAVE, iteration):
            os.kill(os.getpid(), signal.SIGKILL)
