"""Read model tensors of a megatron-hybrid ``torch_dist`` checkpoint without a process group.

Checkpoints store every model tensor in its global (TP=1) layout (``docs/design.md`` §7), so reading
needs neither the saving layout nor a model: each tensor is read with PyTorch distributed
checkpoint's planner (``no_dist``), only the bytes of the requested tensors, one layer at a time.
Fused tensors are stored as their named segments (spec ``docs/model.md`` §7): GDN ``in_proj``
and ``conv1d`` as the segments of ``config.gdn_projection`` (``IN_PROJ_NAMES``, ``CONV_NAMES``);
the reader concatenates them into the project's global keys (``hf.mapping``'s Megatron global
layout).
"""
from __future__ import annotations

import os
import warnings

import torch

from megatron_hybrid.checkpoint.storage import CheckpointError, iteration_dir, read_run_config, read_tracker
from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.config.gdn_projection import CONV_NAMES, IN_PROJ_NAMES

#: global key suffix -> the segment suffixes it is stored as, in concatenation order
SEGMENTS = {
    "self_attention.in_proj.weight": list(IN_PROJ_NAMES),
    "self_attention.conv1d.weight": list(CONV_NAMES),
}


class DistCheckpointReader:
    """Model tensors of one iteration of a checkpoint directory, read on demand.

    Args:
        root: the checkpoint directory (holding ``latest_checkpointed_iteration.txt``).
        iteration: which ``iter_*`` to read (default: the tracker's).

    Raises: CheckpointError for a missing tracker / iteration directory / ``run_config.yaml``
    or a directory that is not a ``torch_dist`` checkpoint.
    """

    def __init__(self, root: str, iteration: int | None = None):
        from torch.distributed.checkpoint import FileSystemReader

        self.root = root
        self.iteration = read_tracker(root) if iteration is None else iteration
        self.path = iteration_dir(root, self.iteration)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path} not found (--iteration {self.iteration})")
        self.run_config = read_run_config(root, self.iteration)
        self.config = OlmoHybridConfig.from_dict(self.run_config["model"])
        if not os.path.isfile(os.path.join(self.path, ".metadata")):
            raise CheckpointError(f"{self.path}/.metadata not found: not a torch_dist checkpoint "
                                  f"(or an interrupted save)")
        self._reader = FileSystemReader(self.path)
        self._meta = self._reader.read_metadata().state_dict_metadata

    # -- what is stored ---------------------------------------------------------------------
    def stored_keys(self, key: str) -> list[str]:
        """The stored keys behind a global key (its segments for fused tensors)."""
        for suffix, parts in SEGMENTS.items():
            if key.endswith(suffix):
                return [f"{key}.{p}" for p in parts]
        return [key]

    def has(self, key: str) -> bool:
        """Whether the checkpoint holds global key ``key``."""
        return all(k in self._meta for k in self.stored_keys(key))

    def shape(self, key: str) -> torch.Size:
        """Global shape of ``key`` (fused segments concatenated on dim 0)."""
        sizes = [self._tensor_meta(k).size for k in self.stored_keys(key)]
        return torch.Size([sum(s[0] for s in sizes), *sizes[0][1:]])

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of ``key``."""
        return self._tensor_meta(self.stored_keys(key)[0]).properties.dtype

    def param_dtype(self) -> torch.dtype:
        """The model parameters' stored dtype (that of the final norm; all are saved alike)."""
        return self.dtype("decoder.final_layernorm.weight")

    def model_keys(self) -> list[str]:
        """Every stored model tensor key (segments listed separately), sorted."""
        return sorted(k for k, m in self._meta.items()
                      if not k.startswith(("optimizer.", "rng_state")) and hasattr(m, "size"))

    def _tensor_meta(self, key: str):
        if key not in self._meta:
            raise CheckpointError(f"{self.path}: no tensor {key!r} in the checkpoint")
        meta = self._meta[key]
        if not hasattr(meta, "size"):
            raise CheckpointError(f"{self.path}: {key!r} is not a tensor")
        return meta

    # -- reading ----------------------------------------------------------------------------
    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Global tensors for ``keys`` (in their stored dtype, on the CPU).

        Raises: CheckpointError when a key is not stored.
        """
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        request = {}
        for key in keys:
            for k in self.stored_keys(key):
                meta = self._tensor_meta(k)
                request[k] = torch.empty(meta.size, dtype=meta.properties.dtype)
        with warnings.catch_warnings():  # "assuming ... a single process": intended here
            warnings.simplefilter("ignore", UserWarning)
            load(request, storage_reader=self._reader, planner=DefaultLoadPlanner(),
                 no_dist=True)
        out = {}
        for key in keys:
            parts = [request.pop(k) for k in self.stored_keys(key)]
            out[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out

    def layer_keys(self, i: int) -> list[str]:
        """Global keys of decoder layer ``i`` (segments merged)."""
        prefix = f"decoder.layers.{i}."
        keys = []
        for k in self.model_keys():
            if not k.startswith(prefix):
                continue
            base = next((f"{k[:k.index(s)]}{s}" for s in SEGMENTS if f"{s}." in k), k)
            if base not in keys:
                keys.append(base)
        return keys

    def read_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Every global tensor of decoder layer ``i``."""
        return self.read(self.layer_keys(i))

    def global_keys(self) -> list[str]:
        """The non-layer model keys stored (embedding, final norm, output layer when untied)."""
        return [k for k in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                            "output_layer.weight") if self.has(k)]
