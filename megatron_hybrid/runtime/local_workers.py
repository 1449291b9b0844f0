"""Local CPU worker processes over gloo, for offline tools (``tools/reshard_checkpoint.py``).

    results = run_local_workers(fn, world_size, x, tp=2, pp=1)   # [fn(0, x), fn(1, x), ...]

Each rank is a ``fork``ed child of the calling process (the parent's imports of torch and
megatron-core are inherited: no re-import), joins a gloo group through a FileStore in a temporary
directory (no port to pick), runs ``initialize_distributed(tp, pp, seed=seed)`` and then
``fn(rank, *args, **kwargs)``. The same technique as the test runner (``tests/dist.py``):

* a child sets ``torch.set_num_threads(1)`` and ``OMP_NUM_THREADS=1`` before any torch compute (a
  forked child must never enter the OpenMP pool of a parent that already ran torch ops);
* a default process group the caller holds is torn down first (it would be inherited
  half-alive);
* children leave with ``os._exit`` after multiprocessing's exit hook (which stops the writer
  Manager that ``dist_checkpointing.save`` starts).

The first exception to arrive is re-raised in the parent, as the same type when it pickles (so a
CheckpointError stays one), with every failed rank's traceback chained as ``WorkerTraceback``;
the other ranks get ``GRACE_S`` seconds, then are killed. The test suite's runner
(``tests/dist.py``) is this function.
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.util  # noqa: F401  (mp.util._exit_function in the children)
import os
import pickle
import queue
import shutil
import sys
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_hybrid.parallel import destroy_distributed, initialize_distributed

__all__ = ["run_local_workers", "WorkerError", "WorkerTraceback", "GRACE_S"]

#: Seconds the other ranks get to report after one rank failed, before they are killed.
GRACE_S = 3.0
#: Seconds a child may spend tearing down after it reported its result.
_JOIN_S = 10.0


class WorkerTraceback(Exception):
    """The formatted tracebacks of the failed ranks (chained as ``__cause__``)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class WorkerError(RuntimeError):
    """A rank failed with an exception that does not pickle, died silently, or returned a result
    that does not unpickle."""


def _child(fn, rank, world_size, store_path, tp, pp, seed, timeout, result_q, args, kwargs):
    code = 0
    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=max(timeout, 1)))
        initialize_distributed(tp, pp, seed=seed, backend="gloo")
        payload = (True, pickle.dumps(fn(rank, *args, **kwargs)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        code = 1
        text = f"--- rank {rank} ---\n{traceback.format_exc()}"
        try:
            blob = pickle.dumps(exc)
            pickle.loads(blob)
        except Exception:  # noqa: BLE001
            blob = None
        payload = (False, (blob, text))
    try:
        result_q.put((rank,) + payload)
        result_q.close()
        result_q.join_thread()
        if code == 0:
            destroy_distributed()
    except BaseException:  # noqa: BLE001
        code = code or 2
    finally:
        try:
            mp.util._exit_function()
        except BaseException:  # noqa: BLE001
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _raise_failures(errors: dict, missing: list, timeout: float):
    """Raise the first-reported failure (the others are usually its consequence), with every
    failed rank's traceback chained as ``WorkerTraceback``."""
    texts = [text for _, text in errors.values()]  # in order of arrival
    if missing:
        texts.append(f"ranks {missing} did not finish within {timeout} s (killed)")
    cause = WorkerTraceback("\n".join(texts))
    if errors:
        first_rank, (blob, _) = next(iter(errors.items()))
        if blob is not None:
            raise pickle.loads(blob) from cause
        raise WorkerError(f"rank {first_rank} failed first:\n{cause}") from cause
    raise TimeoutError(str(cause))


def run_local_workers(fn, world_size: int, *args, tp: int = 1, pp: int = 1, seed: int = 1234,
                      timeout: float = 3600.0, **kwargs) -> list:
    """Run ``fn(rank, *args, **kwargs)`` on ``world_size`` forked gloo ranks at TP x PP (DP =
    world / (TP x PP)); return the results by rank (they must pickle).

    A process group or megatron-core parallel state the caller holds is torn down first (a
    forked child would inherit it half-alive).

    Raises: the first rank's exception (same type when it pickles; tracebacks chained as
    ``WorkerTraceback``); WorkerError when it does not pickle, a rank dies without reporting or a
    result does not unpickle; TimeoutError when ranks are still running after ``timeout`` seconds
    (they are killed); ValueError for world_size < 1.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    destroy_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    ctx = mp.get_context("fork")
    tmpdir = tempfile.mkdtemp(prefix="mh_workers_")
    result_q = ctx.Queue()
    procs, results, errors, dead_since = [], {}, {}, {}
    try:
        for rank in range(world_size):
            proc = ctx.Process(target=_child, name=f"rank{rank}", args=(
                fn, rank, world_size, os.path.join(tmpdir, "store"), tp, pp, seed, timeout,
                result_q, args, kwargs))
            proc.start()
            procs.append(proc)
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                rank, ok, payload = result_q.get(timeout=min(0.2, deadline - now))
            except queue.Empty:
                for rank, proc in enumerate(procs):
                    if rank in results or rank in errors or proc.is_alive():
                        continue
                    # dead but not reported: allow a moment for its last queue write to arrive
                    if now - dead_since.setdefault(rank, now) > 1.0:
                        errors[rank] = (None, f"--- rank {rank} ---\nexited with code "
                                              f"{proc.exitcode} without reporting a result")
                continue
            if ok:
                results[rank] = payload
            else:
                errors[rank] = payload
                deadline = min(deadline, time.monotonic() + GRACE_S)
        missing = [r for r in range(world_size) if r not in results and r not in errors]
        if errors or missing:
            _raise_failures(errors, missing, timeout)
        out = []
        for rank in range(world_size):
            try:
                out.append(pickle.loads(results[rank]))
            except Exception as exc:  # noqa: BLE001
                raise WorkerError(f"rank {rank}: result does not unpickle: {exc}") from None
        return out
    finally:
        stop = time.monotonic() + _JOIN_S
        for proc in procs:
            if errors or len(results) < world_size:
                proc.kill()
            proc.join(max(0.0, stop - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        result_q.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
