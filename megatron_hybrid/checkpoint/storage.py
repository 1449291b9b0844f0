"""Megatron dist checkpoints of Olmo Hybrid models (``docs/design.md`` §7).

Layout: ``DIR/iter_0000100/`` (megatron-core ``torch_dist`` files plus ``run_config.yaml``) and
``DIR/latest_checkpointed_iteration.txt``, written last. Model tensors are stored in their global
layout, so a checkpoint loads at any TP / PP (megatron-core reshards). ``run_config.yaml`` holds the
resolved model config (with the padded vocabulary), the tokenizer, the layout the checkpoint was
saved at and the iteration, so tools learn the model shape without unpickling anything.
"""
from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state

from megatron_hybrid.config import OlmoHybridConfig

TRACKER = "latest_checkpointed_iteration.txt"
RUN_CONFIG = "run_config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be read; the message names the path."""


def iteration_dir(root: str, iteration: int) -> str:
    """``root/iter_{iteration:07d}``."""
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ensure_checkpoint_dir(path) -> str:
    """Create checkpoint directory `path` (with parents) and barrier so every rank sees it.

    Rank 0 creates it (every rank when torch.distributed is not initialized, and also every rank
    after the barrier, which is harmless for a shared file system and needed for per-node local
    disks). Returns the absolute path. Raises OSError when it cannot be created, or when `path`
    exists and is not a directory. Works on any device. Source: docs/megatron_core_notes.md §2 #8 (megatron-core's
    ``dist_checkpointing.save`` does not create its target directory).
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


def current_layout() -> dict[str, int]:
    """This process group's parallel layout (TP, PP, DP, CP sizes)."""
    return {
        "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "context_parallel_size": parallel_state.get_context_parallel_world_size(),
    }


def read_tracker(root: str) -> int:
    """The iteration named by ``root/latest_checkpointed_iteration.txt``.

    Raises: CheckpointError when the file is missing or does not hold an integer.
    """
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: {root} is not a megatron-hybrid checkpoint "
                              f"directory (expected {TRACKER} and iter_XXXXXXX/)")
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def read_run_config(root: str, iteration: int | None = None) -> dict[str, Any]:
    """The ``run_config.yaml`` dict of an iteration (default: the tracker's).

    Raises: CheckpointError when the directory or file is missing.
    """
    it = read_tracker(root) if iteration is None else iteration
    path = os.path.join(iteration_dir(root, it), RUN_CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found (checkpoint iteration {it} is incomplete or "
                              f"was not written by megatron-hybrid)")
    with open(path) as f:
        return yaml.safe_load(f)


def model_config_from_checkpoint(root: str, iteration: int | None = None) -> OlmoHybridConfig:
    """The OlmoHybridConfig recorded in a checkpoint's ``run_config.yaml``."""
    return OlmoHybridConfig.from_dict(read_run_config(root, iteration)["model"])


def save_state(root: str, iteration: int, state: dict[str, Any], model_config: OlmoHybridConfig,
               extra_config: dict[str, Any] | None = None,
               default_layout: dict[str, int] | None = None,
               before_commit: Callable[[], None] | None = None) -> str:
    """Save a sharded state dict (every rank calls this) as ``root/iter_XXXXXXX``; returns that path.

    Args:
        state: megatron-core sharded state dict ({"model": ..., "optimizer": ..., plain objects}).
        extra_config: more top-level entries for ``run_config.yaml`` (e.g. tokenizer, training).
        default_layout: the layout to record (converters record their target layout);
            default: the current one.
        before_commit: called on every rank after the tensors are written, before
            ``run_config.yaml`` and the tracker (fault-injection tests kill the process there).

    ``run_config.yaml`` is written after every rank finished writing the tensors, and the tracker
    file (atomically) after that, so a crash mid-save never leaves the tracker pointing at an
    incomplete directory.
    """
    path = iteration_dir(root, iteration)
    if _rank0():
        if os.path.isdir(path) and os.listdir(path):
            tracked = os.path.isfile(os.path.join(root, TRACKER)) and read_tracker(root) == iteration
            if tracked:
                raise CheckpointError(f"{path} exists and is the latest checkpoint; refusing to "
                                      f"overwrite it")
            warnings.warn(f"{path}: removing an incomplete checkpoint left by an interrupted save",
                          stacklevel=2)
            shutil.rmtree(path)
    ensure_checkpoint_dir(path)  # rank 0 creates it, then a barrier
    dist_checkpointing.save(state, path)
    _barrier()
    if before_commit is not None:
        before_commit()
    if _rank0():
        run_config = {"format": "torch_dist", "iteration": int(iteration),
                      "model": model_config.to_dict(),
                      "parallel": default_layout or current_layout()}
        run_config.update(extra_config or {})
        _write_atomic(os.path.join(path, RUN_CONFIG), yaml.safe_dump(run_config, sort_keys=False))
        _write_atomic(os.path.join(root, TRACKER), f"{iteration}\n")
    _barrier()
    return path


def save_checkpoint(root: str, iteration: int, model, model_config: OlmoHybridConfig,
                    extra_config: dict[str, Any] | None = None,
                    sharded_extra: dict[str, Any] | None = None,
                    default_layout: dict[str, int] | None = None) -> str:
    """Save ``model`` (every rank calls this) as ``root/iter_XXXXXXX``; returns that path.

    Args:
        extra_config: more top-level entries for ``run_config.yaml`` (e.g. tokenizer, args).
        sharded_extra: more entries of the sharded state dict (e.g. the optimizer's).
        default_layout: the layout to record (converters record their target layout);
            default: the current one.

    The tracker file is rewritten (atomically) only after every rank finished writing.
    """
    state = {"model": model.sharded_state_dict()}
    if sharded_extra:
        state.update(sharded_extra)
    return save_state(root, iteration, state, model_config, extra_config, default_layout)


def load_model_checkpoint(root: str, model, iteration: int | None = None) -> int:
    """Load the model weights of ``root`` (tracker iteration by default) into ``model``.

    Works at any TP / PP (megatron-core reshards). Returns the iteration loaded.
    Raises: CheckpointError for a missing directory, a missing or truncated data file or an
    unreadable checkpoint (``load_state``); megatron-core errors for missing tensors.
    """
    it = read_tracker(root) if iteration is None else iteration
    path = iteration_dir(root, it)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} not found")
    state = load_state({"model": model.sharded_state_dict()}, path)
    apply_model_state(model, state["model"], path)
    return it


def apply_model_state(model, model_state: dict, path: str) -> None:
    """``model.load_state_dict(model_state)``, refusing missing or unexpected tensors (TE's
    ``_extra_state`` entries may be absent).

    Raises: CheckpointError naming ``path`` and up to 8 missing / unexpected keys.
    """
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: model tensors missing {missing[:8]}, unexpected "
                              f"{unexpected[:8]}")



def incomplete_iterations(root: str) -> list[str]:
    """``iter_*`` directories of ``root`` that an interrupted save left behind.

    Those without ``run_config.yaml`` (written last by ``save_state``) or newer than the tracker's
    iteration; the tracker never points at one, so loading ignores them.
    """
    try:
        tracked = read_tracker(root)
    except CheckpointError:
        tracked = None
    out = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if not (name.startswith("iter_") and name[5:].isdigit() and os.path.isdir(path)):
            continue
        if not os.path.isfile(os.path.join(path, RUN_CONFIG)) or (
                tracked is not None and int(name[5:]) > tracked):
            out.append(path)
    return out


def check_checkpoint_files(path: str) -> None:
    """Check that every file a ``torch_dist`` iteration directory refers to is there, whole.

    Reads the distributed-checkpoint metadata (``.metadata``) and compares each data file's size
    with the largest offset it must hold; checks ``common.pt``.
    Raises: CheckpointError naming the missing or truncated file.
    """
    from torch.distributed.checkpoint import FileSystemReader

    for name in (".metadata", "common.pt"):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{path}: {name} is missing: the checkpoint is incomplete")
    try:
        storage = FileSystemReader(path).read_metadata().storage_data or {}
    except Exception as exc:  # unreadable metadata
        raise CheckpointError(f"{path}/.metadata cannot be read ({exc})") from None
    needed: dict[str, int] = {}
    for info in storage.values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for rel, end in sorted(needed.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing ({len(needed)} data files expected): the "
                                  f"checkpoint was copied or written incompletely")
        if os.path.getsize(file) < end:
            raise CheckpointError(f"{file} is truncated: {os.path.getsize(file)} bytes, the "
                                  f"checkpoint's metadata needs {end}")


def load_state(request: dict[str, Any], path: str) -> dict[str, Any]:
    """``dist_checkpointing.load(request, path)`` after ``check_checkpoint_files(path)``.

    torch's ``CheckpointException`` (a BaseException, so it escapes every error handler) becomes
    a one-line CheckpointError naming ``path`` and the first rank's failure.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    check_checkpoint_files(path)
    try:
        return dist_checkpointing.load(request, path)
    except CheckpointException as exc:
        failures = getattr(exc, "failures", {}) or {}
        first = next(iter(failures.values()), exc)
        raise CheckpointError(f"{path}: cannot be read ({type(first).__name__}: "
                              f"{str(first).splitlines()[0] if str(first) else ''})") from None
