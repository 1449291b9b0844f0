"""Fork-based multi-process runner for pytest (docs/design.md §5 and §10, docs/megatron_core_notes.md §4).

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

The runner itself is the package's `megatron_hybrid.runtime.local_workers.run_local_workers`
(also used by `tools/reshard_checkpoint.py`); this module fixes the test defaults and names.
"""
from __future__ import annotations

import megatron.core.parallel_state  # noqa: F401  (imported in the parent, inherited by children)

from megatron_hybrid.runtime.local_workers import GRACE_S, run_local_workers
from megatron_hybrid.runtime.local_workers import WorkerError as DistributedTestError
from megatron_hybrid.runtime.local_workers import WorkerTraceback as RemoteTraceback

__all__ = ["run_distributed", "DistributedTestError", "RemoteTraceback", "GRACE_S"]


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
    Source: docs/design.md §10, docs/megatron_core_notes.md §4.
    """
    return run_local_workers(fn, world_size, *args, tp=tp, pp=pp, seed=1234, timeout=timeout,
                             **kwargs)
