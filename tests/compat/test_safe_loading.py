"""Checkpoint objects are unpickled weights-only: a pickled payload in a checkpoint does not run."""
from __future__ import annotations

import os

import pytest

from tests.dist import run_distributed


class _Payload:
    """Unpickling this calls ``open(marker, 'w')``: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _worker(rank, path, marker):
    import numpy as np
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_hybrid.compat import compat_status

    assert compat_status()["safe_loading"]
    rng = {"np": np.random.get_state(), "t": torch.get_rng_state()}
    os.makedirs(path + "/good")
    dist_checkpointing.save({"rng": ShardedObject("rng", rng, (1,), (0,), replica_id=0)},
                            path + "/good")
    back = dist_checkpointing.load({"rng": ShardedObject("rng", None, (1,), (0,),
                                                         replica_id=0)}, path + "/good")["rng"]
    same = all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(back["np"], rng["np"], strict=True)) and torch.equal(back["t"], rng["t"])
    os.makedirs(path + "/bad")
    dist_checkpointing.save({"x": ShardedObject("x", _Payload(marker), (1,), (0,), replica_id=0)},
                            path + "/bad")
    try:
        dist_checkpointing.load({"x": ShardedObject("x", None, (1,), (0,), replica_id=0)},
                                path + "/bad")
        refused = ""
    except BaseException as exc:  # UnpicklingError, wrapped in DCP's CheckpointException
        refused = str(exc)
    return same, refused


@pytest.mark.distributed
def test_rng_state_round_trips_and_a_pickled_payload_is_refused(tmp_path):
    marker = str(tmp_path / "payload_ran")
    same, refused = run_distributed(_worker, 1, str(tmp_path), marker)[0]
    assert same
    assert "Weights only load failed" in refused or "Unsupported global" in refused, refused
    assert not os.path.exists(marker)
