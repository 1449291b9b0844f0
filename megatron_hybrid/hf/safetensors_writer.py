"""Write a Hugging Face safetensors checkpoint shard by shard (bounded memory).

Tensors are buffered until the next one would push the shard past ``max_shard_bytes``; the
shard is then written and the buffer freed. ``finish`` names the files as transformers does
(``model.safetensors`` for one shard; else ``model-00001-of-0000N.safetensors`` plus
``model.safetensors.index.json`` with ``metadata.total_size`` and ``weight_map``).
"""
from __future__ import annotations

import json
import os
import re

import torch

UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
         "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def parse_size(text: str) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"2GiB"`` or a plain integer (transformers' units).

    Raises: ValueError for anything else.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or "
                         f"an integer number of bytes")
    value = float(m.group(1)) * UNITS[(m.group(2) or "").upper()]
    if value < 1:
        raise ValueError(f"--max-shard-size {text!r}: must be at least 1 byte")
    return int(value)


class ShardedSafetensorsWriter:
    """Accumulates named tensors into safetensors shards inside ``directory``.

    Args:
        directory: an existing (temporary) output directory.
        max_shard_bytes: shard size limit; a single larger tensor gets a shard of its own.
    """

    def __init__(self, directory: str, max_shard_bytes: int):
        self.directory = directory
        self.max_shard_bytes = int(max_shard_bytes)
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` (contiguous CPU copy kept) under ``name``; may write a shard.

        Raises: ValueError for a name added twice.
        """
        if name in self._buffer or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().contiguous().cpu()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _tmp_name(self, index: int) -> str:
        return os.path.join(self.directory, f".shard-{index:05d}.safetensors")

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buffer:
            return
        save_file(self._buffer, self._tmp_name(len(self._shards)), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give every shard its final name, write the index (>1 shard).

        Returns: the file names written (relative to ``directory``).
        """
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self._tmp_name(0), os.path.join(self.directory, "model.safetensors"))
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, tensors in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._tmp_name(i), os.path.join(self.directory, name))
            names.append(name)
            weight_map.update({t: name for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        return names + ["model.safetensors.index.json"]
