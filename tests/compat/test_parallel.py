"""Tests of megatron_hybrid.parallel (initialize_distributed) and the fork runner tests/dist.py.

The runner tests cover the parent-state problem of docs/megatron_core_notes.md §4 (a parent that already
ran multi-threaded torch ops), error propagation, dead and hung children.
"""
from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest
import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_hybrid.parallel import destroy_distributed, initialize_distributed
from tests.dist import DistributedTestError, RemoteTraceback, run_distributed

pytestmark = pytest.mark.usefixtures("compat")


def test_initialize_distributed_rejects_bad_layout(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="--tensor-model-parallel-size.*--pipeline-model"):
        initialize_distributed(tensor_model_parallel_size=3)
    with pytest.raises(ValueError, match="--context-parallel-size"):
        initialize_distributed(context_parallel_size=0)
    assert not torch.distributed.is_initialized()


def _layout_worker(rank):
    info = initialize_distributed(1, 2)  # what the runner did: same arguments, no reseed
    draws = (torch.rand(3), random.random(), float(np.random.rand()))
    with tensor_parallel.get_cuda_rng_tracker().fork():
        tp_draw = torch.rand(3)
    again = initialize_distributed(1, 2) is info
    tp2 = initialize_distributed(2, 1)  # other sizes: groups re-created
    return info, again, draws, tp_draw, tp2, ps.get_tensor_model_parallel_world_size()


@pytest.mark.distributed
def test_initialize_distributed_seeds_like_megatron():
    results = run_distributed(_layout_worker, 2, pp=2)
    for rank, (info, again, draws, tp_draw, tp2, tp_size) in enumerate(results):
        assert (info.rank, info.world_size, info.pipeline_model_parallel_size) == (rank, 2, 2)
        assert info.data_parallel_size == 1 and info.backend == "gloo" and again
        seed = 1234 + 100 * rank  # Megatron: seed + 100 * pp_rank
        assert torch.equal(draws[0], torch.rand(3, generator=torch.Generator().manual_seed(seed)))
        assert draws[1] == random.Random(seed).random()
        assert draws[2] == float(np.random.RandomState(seed).rand())
        expected_tp = torch.rand(3, generator=torch.Generator().manual_seed(seed + 2718))
        assert torch.equal(tp_draw, expected_tp)
        assert (tp2.tensor_model_parallel_size, tp2.data_parallel_size, tp_size) == (2, 1, 2)


def _single_process_worker(rank):
    destroy_distributed()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    info = initialize_distributed()
    again = initialize_distributed() is info
    return info.world_size, info.rank, again, ps.get_data_parallel_world_size()


@pytest.mark.distributed
def test_initialize_distributed_defaults_to_one_process():
    assert run_distributed(_single_process_worker, 1) == [(1, 0, True, 1)]


def _fail_on_rank1(rank):
    if rank == 1:
        raise KeyError("rank one failed")
    torch.distributed.barrier()


@pytest.mark.distributed
def test_runner_propagates_child_exception():
    with pytest.raises(KeyError, match="rank one failed") as err:
        run_distributed(_fail_on_rank1, 2)
    assert isinstance(err.value.__cause__, RemoteTraceback)
    remote = str(err.value.__cause__)
    assert "--- rank 1 ---" in remote and "_fail_on_rank1" in remote


def _die_or_sleep(rank, mode):
    if rank == 1:
        if mode == "die":
            os._exit(3)
        time.sleep(60)
    return rank


@pytest.mark.distributed
def test_runner_reports_dead_and_hung_children():
    with pytest.raises(DistributedTestError, match="exited with code 3"):
        run_distributed(_die_or_sleep, 2, "die")
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish"):
        run_distributed(_die_or_sleep, 2, "hang", timeout=1.5)


def _matmul_worker(rank):
    a = torch.randn(256, 256)
    return torch.get_num_threads(), float((a @ a).sum() * 0)


@pytest.mark.distributed
def test_runner_survives_parent_thread_pool():
    """A parent that ran multi-threaded (OpenMP) ops must not make forked children hang."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(512, 512)
        for _ in range(3):
            a = (a @ a).clamp(-1, 1)
        assert run_distributed(_matmul_worker, 2, timeout=30) == [(1, 0.0), (1, 0.0)]
    finally:
        torch.set_num_threads(old)
