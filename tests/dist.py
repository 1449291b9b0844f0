"""Fork-based multi-process runner for pytest (design.md §5 and §10, megatron_core_notes.md §4).

    from tests.dist import run_distributed
    results = run_distributed(fn, 2, x, tp=2)   # [fn(0, x), fn(1, x)], one process per rank

Each rank is a `fork`ed child of the pytest process: it inherits the already imported torch and
megatron-core (importing them costs ~6 s; `spawn` re-imports: ~5 s per test, fork: ~0.3 s), joins a
gloo group through a FileStore in a temporary directory (no TCP port to pick or race for), runs
`megatron_hybrid.parallel.initialize_distributed(tp, pp)` (compat patches, model-parallel groups,
Megatron seeding), then `fn(rank, *args, **kwargs)`.

The parent-state problem, and what makes fork robust here:
  * Intra-op thread pool. torch's CPU build uses GNU OpenMP. Once the parent has run any
    multi-threaded op (any earlier test in the same pytest process), a forked child that enters an
    OpenMP parallel region waits forever for pool threads that do not exist in the child (checked:
    a 512x512 matmul hangs). Each child therefore calls `torch.set_num_threads(1)` before any torch
    compute: OpenMP then runs regions inline and never touches the inherited pool. This works no
    matter what the parent did, so the parent's thread setting is left alone. Children also set
    OMP_NUM_THREADS=1 for anything they start.
  * Process groups. A default process group (or megatron-core parallel state) initialized in the
    parent would be inherited half-alive (its store/gloo threads do not survive fork).
    `run_distributed` tears the parent's down first (`destroy_distributed()`); a later in-process
    user simply calls `initialize_distributed()` again.
  * Torch-function modes and patches live in process memory: whatever compat the parent applied is
    inherited; each child applies `apply_compat()` anyway (idempotent).
  * Exit. Children leave with `os._exit` after flushing the result queue and stdio, so pytest's
    atexit handlers and finalizers copied from the parent never run twice.
  * Import heavy modules (megatron.core.models.gpt, ...) at the top of the test module, i.e. in the
    parent, so that children do not import them again.

Failures: the first exception to arrive from any rank is re-raised in the parent (same type when it
pickles), with every failed child's formatted traceback chained as `RemoteTraceback`; ranks still
running get GRACE_S seconds to report, then are killed (they usually hang in a collective with the
failed rank). A child that dies without reporting, or a run that exceeds `timeout`, raises
`DistributedTestError`/`TimeoutError` and kills every child that is still alive.
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

import megatron.core.parallel_state  # noqa: F401  (imported in the parent, inherited by children)
from megatron_hybrid.parallel import destroy_distributed, initialize_distributed

__all__ = ["run_distributed", "DistributedTestError", "RemoteTraceback", "GRACE_S"]

_CTX = mp.get_context("fork")
#: Seconds the other ranks get to report after one rank failed, before they are killed.
GRACE_S = 3.0
#: Seconds a child may spend tearing down after it reported its result.
_JOIN_S = 10.0


class RemoteTraceback(Exception):
    """Carries a child's formatted traceback; chained as `__cause__` of the re-raised error."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class DistributedTestError(RuntimeError):
    """A rank failed with an unpicklable exception, died without reporting, or returned junk."""


def _child(fn, rank, world_size, store_path, tp, pp, timeout, result_q, args, kwargs):
    """Body of one forked rank: init gloo + megatron, run fn, report, tear down, os._exit."""
    code = 0
    try:
        torch.set_num_threads(1)  # never enter the OpenMP pool inherited from the parent
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
            OMP_NUM_THREADS="1",
        )
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size,
            timeout=timedelta(seconds=max(timeout, 1)),
        )
        initialize_distributed(tp, pp)
        payload = (True, pickle.dumps(fn(rank, *args, **kwargs)))
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
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
            # os._exit skips multiprocessing's exit hook: run it, or the Manager process that
            # dist_checkpointing.save starts outlives the rank (and holds pytest's stdout open).
            mp.util._exit_function()
        except BaseException:  # noqa: BLE001
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _raise_failures(errors: dict, timed_out: list, timeout: float):
    """Raise the first-reported failure (others are usually its consequence) with all tracebacks."""
    texts = [text for _, text in errors.values()]  # in order of arrival
    if timed_out:
        texts.append(f"ranks {timed_out} did not finish within {timeout} s (killed)")
    remote = RemoteTraceback("\n".join(texts))
    if errors:
        first_rank, (blob, _) = next(iter(errors.items()))
        if blob is not None:
            raise pickle.loads(blob) from remote
        raise DistributedTestError(f"rank {first_rank} failed first:\n{remote}") from remote
    raise TimeoutError(str(remote))


def run_distributed(fn, world_size: int, *args, tp: int = 1, pp: int = 1, timeout: float = 120,
                    **kwargs) -> list:
    """Run `fn(rank, *args, **kwargs)` on `world_size` forked gloo ranks; return results by rank.

    Every rank has `initialize_distributed(tp, pp)` done (seed 1234, compat applied,
    OMP_NUM_THREADS=1, one intra-op thread). Return values must be picklable. The parent's own
    process group / parallel state, if any, is destroyed first (see the module docstring).

    Raises: the first reported rank exception (re-raised in the parent, child tracebacks chained
    as `RemoteTraceback`; an unpicklable return value surfaces as the child's pickling error);
    `DistributedTestError` when that exception does not pickle or a rank dies without reporting;
    `TimeoutError` when ranks are still running after `timeout` seconds (they are killed);
    ValueError for world_size < 1.
    Source: design.md §10, megatron_core_notes.md §4.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if dist.is_initialized() or megatron.core.parallel_state.model_parallel_is_initialized():
        destroy_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    tmpdir = tempfile.mkdtemp(prefix="mh_dist_")
    result_q = _CTX.Queue()
    procs = []
    results, errors, dead_since = {}, {}, {}
    try:
        for rank in range(world_size):
            proc = _CTX.Process(
                target=_child, daemon=False, name=f"rank{rank}",
                args=(fn, rank, world_size, os.path.join(tmpdir, "store"), tp, pp, timeout,
                      result_q, args, kwargs),
            )
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
                    # Dead but not reported: allow a moment for its last queue write to arrive.
                    if now - dead_since.setdefault(rank, now) > 1.0:
                        errors[rank] = (None, f"--- rank {rank} ---\nexited with code "
                                              f"{proc.exitcode} without reporting a result")
                continue
            if ok:
                results[rank] = payload
            else:
                errors[rank] = payload
                deadline = min(deadline, time.monotonic() + GRACE_S)
        timed_out = [r for r in range(world_size) if r not in results and r not in errors]
        if errors or timed_out:
            _raise_failures(errors, timed_out, timeout)
        out = []
        for rank in range(world_size):
            try:
                out.append(pickle.loads(results[rank]))
            except Exception as exc:  # noqa: BLE001
                raise DistributedTestError(f"rank {rank}: result does not unpickle: {exc}")
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
