"""Patch #8 of docs/megatron_core_notes.md §2: `dist_checkpointing.save` into a missing directory.

megatron-core's `dist_checkpointing.save` does not create its target directory and fails with
`FileNotFoundError` (from `iterdir`). Every rank must see the directory before any rank saves.
"""
from __future__ import annotations

import os

import torch


def ensure_checkpoint_dir(path) -> str:
    """Create checkpoint directory `path` (with parents) and barrier so every rank sees it.

    Rank 0 creates it (every rank when torch.distributed is not initialized, and also every rank
    after the barrier, which is harmless for a shared file system and needed for per-node local
    disks). Returns the absolute path. Raises OSError when it cannot be created, or when `path`
    exists and is not a directory. Works on any device. Source: docs/megatron_core_notes.md §2 #8.
    """
    path = os.path.abspath(os.fspath(path))
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized or dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    if initialized:
        dist.barrier()
        os.makedirs(path, exist_ok=True)
    if not os.path.isdir(path):
        raise NotADirectoryError(path)
    return path
