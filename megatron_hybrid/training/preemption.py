"""Stopping cleanly: preemption signals and the wall-clock limit, agreed by every rank.

SIGTERM (what torchrun forwards to its workers, and Slurm sends at the end of a job) and SIGUSR1
(Slurm's ``--signal=USR1@120`` warning) only set a flag here; the training loop asks
``StopController.check`` at each iteration boundary, which all-reduces the flags (MAX) so every
rank stops after the same iteration, saves, and exits 0. ``--exit-duration-in-mins`` is checked the
same way, from the start of training (Megatron-LM's flag).
"""
from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterable

import torch
import torch.distributed as dist

#: signals that request a save-and-exit
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_REASONS = {0: None, 1: "signal", 2: "exit-duration"}


class StopController:
    """Signal flags and the time limit; ``check`` returns why to stop (or None).

    Args:
        exit_duration_in_mins: stop once this many minutes passed since construction (None: no
            limit).
        signals: signals to catch (their previous handlers are restored by ``close``).
        device: where the all-reduce tensor lives (the process group's device).
    """

    def __init__(self, exit_duration_in_mins: float | None = None,
                 signals: Iterable[int] = STOP_SIGNALS, device: torch.device | None = None):
        self.start = time.time()
        self.limit_s = None if exit_duration_in_mins is None else 60.0 * exit_duration_in_mins
        self.device = device or torch.device("cpu")
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. a test harness): no handler
                pass

    def _on_signal(self, signum, frame):
        if self.received is None:
            self.received = signum
            print(f"received {signal.Signals(signum).name}: saving a checkpoint after this "
                  f"iteration, then exiting", file=sys.stderr, flush=True)

    def check(self) -> str | None:
        """Why every rank should stop now: ``"signal"``, ``"exit-duration"`` or None.

        A collective when torch.distributed is initialized: call it on every rank, at the same
        point of the loop.
        """
        code = 1 if self.received is not None else 0
        if not code and self.limit_s is not None and time.time() - self.start >= self.limit_s:
            code = 2
        if dist.is_initialized():
            flag = torch.tensor([code], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        return _REASONS[code]

    def close(self) -> None:
        """Restore the signal handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
