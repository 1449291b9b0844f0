"""Timers (CUDA events on GPU, host clock on CPU), the measured bf16 matmul ceiling, the time
budget of ``--max-minutes``, and peak memory.

Every time is measured after a warm-up and reported as the median of the timed repetitions
(``METHOD.md``: warm up, repeat, take the median). Units: milliseconds unless named ``*_s``.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RegionTimer:
    """Named regions of one iteration, timed with CUDA events (GPU) or the host clock (CPU).

    Usage::

        t = RegionTimer(device)
        with t.region("iteration"):
            with t.region("fwd_bwd"): ...
            with t.region("optimizer"): ...
        ms = t.elapsed_ms()     # synchronizes; {"iteration": .., "fwd_bwd": .., "optimizer": ..}

    CUDA events measure the GPU timeline between the two records, so launch gaps (a host-bound
    step) count, as they do in training.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._marks: dict[str, list] = {}

    @contextlib.contextmanager
    def region(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._marks[name] = [start, end]
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._marks[name] = [t0, time.perf_counter()]

    def elapsed_ms(self) -> dict[str, float]:
        """Milliseconds per region (synchronizes the device first)."""
        synchronize(self.device)
        if self.cuda:
            return {k: s.elapsed_time(e) for k, (s, e) in self._marks.items()}
        return {k: (e - s) * 1e3 for k, (s, e) in self._marks.items()}


def median(xs: list[float]) -> float | None:
    """Median of a non-empty list, else None."""
    return statistics.median(xs) if xs else None


def time_fn(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of ``fn()`` for each of ``iters`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(iters):
        t = RegionTimer(device)
        with t.region("call"):
            fn()
        out.append(t.elapsed_ms()["call"])
    return out


def matmul_ceiling_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192,
                          warmup: int = 3, iters: int = 10) -> dict:
    """The measured dense matmul rate: median TFLOP/s of an [n, n] x [n, n] product.

    Inputs are random normal (zeros run faster, ``METHOD.md``); two input sets alternate.
    Returns {"n", "dtype", "median_ms", "tflops"}; 2 n^3 FLOP per product.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    ab = [torch.randn(n, n, generator=gen, device=device, dtype=torch.float32).to(dtype)
          for _ in range(4)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    i = [0]

    def mm():
        j = i[0] % 2
        torch.matmul(ab[2 * j], ab[2 * j + 1], out=out)
        i[0] += 1

    ms = median(time_fn(mm, device, warmup, iters))
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_ms": ms,
            "tflops": 2.0 * n ** 3 / (ms * 1e-3) / 1e12}


class Deadline:
    """The ``--max-minutes`` guard: the run's wall-clock budget, counted from construction.

    Phases ask ``expired()`` before starting (skipped phases are reported as such) and timed
    loops stop early once it is spent (after at least one timed iteration).
    """

    def __init__(self, max_minutes: float | None):
        self.t0 = time.time()
        self.budget_s = None if max_minutes is None else 60.0 * max_minutes

    def elapsed_s(self) -> float:
        return time.time() - self.t0

    def remaining_s(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - self.elapsed_s()

    def expired(self) -> bool:
        return self.remaining_s() <= 0

    def describe(self) -> str:
        budget = "no limit" if self.budget_s is None else f"budget {self.budget_s / 60:.1f} min"
        return f"{self.elapsed_s() / 60:.1f} min elapsed ({budget})"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """torch.cuda.max_memory_allocated since the last reset, GiB; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def allocated_gib(device: torch.device) -> float | None:
    """Memory currently allocated by tensors, GiB; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device) / 2 ** 30


def free_device_memory(device: torch.device) -> None:
    """Collect garbage (model / optimizer cycles) and return cached blocks to the driver."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_timed_iterations(step: Callable[[RegionTimer], torch.Tensor | None],
                         device: torch.device, warmup: int, iters: int,
                         deadline: Deadline | None = None, out: dict | None = None) -> dict:
    """Run an engine's training step ``warmup + iters`` times and time it.

    ``step(timer)`` runs one iteration, opening regions ``zero_grad``, ``fwd_bwd`` and
    ``optimizer`` inside the ``iteration`` region this function opens, and returns the
    iteration's loss (a 0-dim tensor, read after timing). Peak memory is reset before the first
    iteration.

    Returns: {"first_iteration_s" (wall, includes compilation and autotuning), "warmup_s" [..],
    "iteration_ms" / "zero_grad_ms" / "fwd_bwd_ms" / "optimizer_ms" (lists over timed
    iterations), "losses"
    (every iteration, warm-up included), "timed_iterations", "truncated" (stopped by the
    deadline), "peak_memory_gib"}. ``out``: a dict to fill in place as iterations complete (the
    caller keeps what was measured when the run is interrupted).
    """
    reset_peak_memory(device)
    keys = ("iteration", "zero_grad", "fwd_bwd", "optimizer")
    out = {} if out is None else out
    out.update({"warmup_s": [], "losses": [], "truncated": False, "first_iteration_s": None,
                "timed_iterations": 0, "peak_memory_gib": None,
                **{f"{k}_ms": [] for k in keys}})
    for i in range(warmup + iters):
        if i > warmup and deadline is not None and deadline.expired():
            out["truncated"] = True
            break
        synchronize(device)
        t0 = time.time()
        timer = RegionTimer(device)
        with timer.region("iteration"):
            loss = step(timer)
        ms = timer.elapsed_ms()
        wall = time.time() - t0
        out["losses"].append(None if loss is None else float(loss))
        if i < warmup:
            out["warmup_s"].append(wall)
            out["first_iteration_s"] = out["warmup_s"][0]
            continue
        for key in keys:
            if key in ms:
                out[f"{key}_ms"].append(ms[key])
        out["first_iteration_s"] = out["warmup_s"][0] if out["warmup_s"] else None
        out["timed_iterations"] = len(out["iteration_ms"])
        out["peak_memory_gib"] = peak_memory_gib(device)
    return out
