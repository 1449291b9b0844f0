"""Fault injection for the reliability tests (never set in real runs).

``MEGATRON_HYBRID_INJECT_FAULT`` holds comma-separated faults:

* ``nan-loss@N`` (iteration N), ``nan-loss@N+`` (N and every later iteration): the last pipeline
  stage's loss of that iteration is multiplied by NaN, so the loss and every gradient are NaN;
* ``kill-during-save@N``: the process SIGKILLs itself inside the save of iteration N, after the
  tensors are written and before ``run_config.yaml`` and the tracker (the worst moment).

Iterations count from 1 (the iteration a step produces, as in the logs).
"""
from __future__ import annotations

import os
import signal

ENV = "MEGATRON_HYBRID_INJECT_FAULT"


def _faults() -> dict[str, tuple[int, bool]]:
    spec = os.environ.get(ENV, "").strip()
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, at = item.partition("@")
        onwards = at.endswith("+")
        try:
            out[name] = (int(at.rstrip("+")), onwards)
        except ValueError:
            raise ValueError(f"{ENV}={spec!r}: expected NAME@ITERATION[+], e.g. nan-loss@3") from None
    return out


def active(name: str, iteration: int) -> bool:
    """Whether fault ``name`` fires at ``iteration``."""
    fault = _faults().get(name)
    if fault is None:
        return False
    at, onwards = fault
    return iteration == at or (onwards and iteration >= at)


def kill_if(name: str, iteration: int) -> None:
    """SIGKILL this process when fault ``name`` fires at ``iteration``."""
    if active(name, iteration):
        os.kill(os.getpid(), signal.SIGKILL)
