"""Checkpoint objects are unpickled with ``torch.load(weights_only=True)`` (no code execution).

torch's distributed-checkpoint planner loads every non-tensor item (megatron-core
``ShardedObject``s: RNG states, ``_extra_state``) with ``torch.load(value, weights_only=False)``,
which runs arbitrary pickled code from a checkpoint file. This patch replaces
``DefaultLoadPlanner.load_bytes`` (megatron-core's planners inherit it) with a
``weights_only=True`` load that additionally allows the NumPy types of ``np.random.get_state()``
(the only non-torch objects the trainer stores). megatron-core's ``common.pt`` is already read
with torch's default, ``weights_only=True``. A checkpoint holding anything else fails with
torch's ``UnpicklingError`` naming the refused global.
"""
from __future__ import annotations

import torch

_APPLIED = False


def numpy_safe_globals() -> list:
    """The NumPy globals a pickled ``np.random.get_state()`` needs (numpy 1.x and 2.x)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    out = [_reconstruct, np.ndarray, np.dtype]
    out += [type(np.dtype(t)) for t in ("uint32", "int32", "int64", "float64", "float32",
                                        "uint8", "bool")]
    return out


def safe_torch_load(value):
    """``torch.load(value, weights_only=True)`` with the NumPy RNG types allowed."""
    with torch.serialization.safe_globals(numpy_safe_globals()):
        return torch.load(value, weights_only=True, map_location="cpu")


def apply() -> None:
    """Patch ``DefaultLoadPlanner.load_bytes`` (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    def load_bytes(self, read_item, value):
        obj = safe_torch_load(value)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    load_bytes._megatron_hybrid_safe = True
    DefaultLoadPlanner.load_bytes = load_bytes
    _APPLIED = True


def is_applied() -> bool:
    """Whether the planner's ``load_bytes`` is the weights-only one."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    return getattr(DefaultLoadPlanner.load_bytes, "_megatron_hybrid_safe", False)
