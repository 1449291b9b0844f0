"""First-fit waves: cases run side by side on disjoint GPUs, as many as fit, in list order.

A wave takes the pending cases in order and starts each one whose processes fit the GPUs still free
and whose ``needs`` (another case) is no longer pending; the rest wait for the next wave. On the CPU
(gloo processes stand for GPUs) or with ``one_per_wave`` a wave holds one case. A wave starts only
with ``min_start_s`` of the budget left; the cases then pending are skipped. Each case of a wave gets
the time limit min(budget left, ``timeout_cap``) in whole seconds.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from megatron_hybrid.gpu_checks.runner import Budget, log


@dataclasses.dataclass(frozen=True)
class Case:
    """One launch to schedule: ``nproc`` GPUs (processes), after the case named ``needs``."""

    name: str
    nproc: int
    needs: str | None = None
    data: object = None


def plan_wave(pending: Sequence[Case], num_devices: int, one_per_wave: bool
              ) -> tuple[list[Case], list[Case]]:
    """Split ``pending`` into (this wave, the rest), first fit in list order."""
    names = {c.name for c in pending}
    free, wave, rest = num_devices, [], []
    for case in pending:
        if (case.needs in names) or case.nproc > free or (one_per_wave and wave):
            rest.append(case)
        else:
            wave.append(case)
            free -= case.nproc
    return wave, rest


def device_slices(wave: Sequence[Case], devices: Sequence[str], cpu: bool) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each case of a wave: consecutive disjoint slices ('' on CPU)."""
    out, first = [], 0
    for case in wave:
        out.append("" if cpu else ",".join(devices[first:first + case.nproc]))
        first += case.nproc
    return out


@dataclasses.dataclass
class Waves:
    """How to run a list of cases: ``run(case, visible_devices, timeout_s) -> exit status``,
    ``done(case, status, seconds, cases_in_the_wave)`` after each, ``skip(case, reason)``."""

    kind: str
    devices: Sequence[str]
    budget: Budget
    min_start_s: float
    timeout_cap: int
    run: Callable[[Case, str, int], int]
    done: Callable[[Case, int, float, int], None]
    skip: Callable[[Case, str], None]
    cpu: bool = False
    one_per_wave: bool = False
    sequential: bool = False   # one case after the other (a dry run prints the commands in order)


def run_waves(cases: Sequence[Case], w: Waves) -> int:
    """Run every case in first-fit waves; returns the number of waves."""
    pending, number = list(cases), 0
    while pending:
        left = int(w.budget.left())
        if left < w.min_start_s:
            for case in pending:
                w.skip(case, f"skipped: time budget (--budget-s {w.budget.budget_s:g})")
            return number
        wave, rest = plan_wave(pending, len(w.devices), w.cpu or w.one_per_wave)
        if not wave:
            for case in pending:
                w.skip(case, "skipped: not schedulable")
            return number
        number += 1
        timeout = min(left, w.timeout_cap)
        slices = device_slices(wave, w.devices, w.cpu)
        desc = " ".join(f"{c.name}[{s or f'cpu x{c.nproc}'}]" for c, s in zip(wave, slices, strict=True))
        log(f"{w.kind} wave {number} (timeout {timeout} s): {desc}")
        for case, (rc, seconds) in zip(wave, _launch(wave, slices, timeout, w), strict=True):
            w.done(case, rc, seconds, len(wave))
        pending = rest
    return number


def _launch(wave, slices, timeout, w: Waves) -> list[tuple[int, float]]:
    """Run the cases of one wave side by side (or in turn); (status, seconds) of each."""
    def one(case, visible):
        t0 = time.time()
        rc = w.run(case, visible, timeout)
        return rc, time.time() - t0

    if w.sequential or len(wave) == 1:
        return [one(c, s) for c, s in zip(wave, slices, strict=True)]
    with ThreadPoolExecutor(max_workers=len(wave)) as pool:
        futures = [pool.submit(one, c, s) for c, s in zip(wave, slices, strict=True)]
        return [f.result() for f in futures]
