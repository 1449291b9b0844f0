"""Process-group and model-parallel initialization (docs/design.md §5, docs/megatron_core_notes.md §2-§3).

`initialize_distributed` works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT),
as a plain single process (no env: world 1), and inside the forked test workers of `tests/dist.py`
(which create the default process group themselves; an existing default group is reused).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_hybrid.compat import apply_compat

__all__ = ["DistributedInfo", "initialize_distributed", "destroy_distributed", "distributed_info"]


@dataclass(frozen=True)
class DistributedInfo:
    """What `initialize_distributed` set up for this process."""

    rank: int
    world_size: int
    local_rank: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    context_parallel_size: int
    data_parallel_size: int
    backend: str
    device: torch.device
    seed: int


_INFO: DistributedInfo | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from err


def _check_sizes(world_size: int, tp: int, pp: int, cp: int) -> int:
    """Return the data-parallel size; raise ValueError naming the flags for an invalid layout."""
    for flag, value in (
        ("--tensor-model-parallel-size", tp),
        ("--pipeline-model-parallel-size", pp),
        ("--context-parallel-size", cp),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}) x --context-parallel-size ({cp}) = "
            f"{model_parallel}; the data-parallel size would not be an integer"
        )
    return world_size // model_parallel


def _current_sizes():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
    )


def _set_random_seed(seed: int) -> None:
    """Megatron's `_set_random_seed`: seed + 100 * pp_rank for python, numpy, torch, the tracker."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _init_process_group(rank: int, world_size: int, local_rank: int, backend: str | None,
                        timeout_minutes: int | None) -> None:
    """The default process group: in-process store for a lone process, ``env://`` otherwise.

    Raises RuntimeError when LOCAL_RANK has no GPU, or WORLD_SIZE > 1 without MASTER_ADDR/PORT.
    """
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                "are visible; start at most one process per GPU"
            )
        torch.cuda.set_device(local_rank)
    kw = {} if timeout_minutes is None else {"timeout": timedelta(minutes=timeout_minutes)}
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)
        return
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with "
            "torchrun or set MASTER_ADDR/MASTER_PORT"
        )
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, **kw)


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int | None = None,
) -> DistributedInfo:
    """Initialize torch.distributed, megatron-core's parallel groups and RNGs; return the layout.

    * Reads RANK, WORLD_SIZE, LOCAL_RANK (torchrun); without them: a single process (world 1,
      in-process store, no port). With WORLD_SIZE > 1, MASTER_ADDR/MASTER_PORT must be set
      (`env://`). An already initialized default process group is reused as is.
    * backend: "nccl" when CUDA is available (the CUDA device is set to LOCAL_RANK), else "gloo".
    * Applies `megatron_hybrid.compat.apply_compat()` before anything touches megatron-core.
    * `parallel_state.initialize_model_parallel(tp, pp, context_parallel_size=cp)`.
    * Seeds like Megatron's `_set_random_seed`: s = seed + 100 * pp_rank for `random`, numpy,
      `torch.manual_seed` and `model_parallel_cuda_manual_seed(s)` (TP stream s + 2718 + tp_rank).
    * timeout_minutes: collective timeout of the process groups (``--distributed-timeout-minutes``;
      default: torch's).
    * Idempotent: the same arguments again return the same `DistributedInfo` without reseeding.
      Different parallel sizes re-create the model-parallel groups (the default group is kept) and
      reseed; a different seed reseeds.

    Raises ValueError when the world size is not divisible by tp * pp * cp (naming
    --tensor-model-parallel-size, --pipeline-model-parallel-size, --context-parallel-size), for a
    non-positive size or seed, or for malformed env variables; RuntimeError when WORLD_SIZE > 1 and
    MASTER_ADDR/MASTER_PORT are missing, or when LOCAL_RANK has no GPU.
    Source: docs/design.md §5, docs/megatron_core_notes.md §2-§3.
    """
    global _INFO
    from megatron.core import parallel_state as ps

    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    if not isinstance(seed, int) or seed <= 0:
        raise ValueError(f"--seed must be a positive integer, got {seed!r}")
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        local_rank = _env_int("LOCAL_RANK", rank)
    dp = _check_sizes(world_size, tp, pp, cp)
    if _INFO is not None and dist.is_initialized():
        same = (_INFO.tensor_model_parallel_size, _INFO.pipeline_model_parallel_size,
                _INFO.context_parallel_size, _INFO.seed) == (tp, pp, cp, seed)
        if same and _current_sizes() == (tp, pp, cp):
            return _INFO

    apply_compat()
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        _init_process_group(rank, world_size, local_rank, backend, timeout_minutes)
    backend = dist.get_backend()

    sizes = _current_sizes()
    if sizes is not None and sizes != (tp, pp, cp):
        ps.destroy_model_parallel()
        sizes = None
    if sizes is None:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            **({} if timeout_minutes is None else {"distributed_timeout_minutes": timeout_minutes}),
        )
    _set_random_seed(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    _INFO = DistributedInfo(rank, world_size, local_rank, tp, pp, cp, dp, str(backend), device,
                            seed)
    return _INFO


def distributed_info() -> DistributedInfo | None:
    """The `DistributedInfo` of the last `initialize_distributed`, or None when not initialized."""
    return _INFO


def destroy_distributed() -> None:
    """Tear down megatron-core's parallel groups and the default process group (idempotent).

    Safe to call when nothing is initialized. Source: docs/design.md §5.
    """
    global _INFO
    from megatron.core import parallel_state as ps

    _INFO = None
    try:
        ps.destroy_model_parallel()  # resets every group global, also after a partial init
    except (RuntimeError, ValueError):  # pragma: no cover - stale groups, dead default group
        pass
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_last_rank() -> bool:
    """Global rank world_size - 1 (on the last pipeline stage): Megatron's logging rank."""
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_last(msg: str) -> None:
    """Print (flushed) on the last rank only."""
    if is_last_rank():
        print(msg, flush=True)


def print_rank_0(msg: str) -> None:
    """Print (flushed) on global rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)
