"""Reading Hugging Face ``olmo_hybrid`` directories: ``config.json`` and safetensors (single or sharded).

Weights are read only through safetensors (never pickles).
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFCheckpointError(RuntimeError):
    """An HF directory that cannot be read; the message names the file."""


@contextlib.contextmanager
def open_safetensors(file: str):
    """``safe_open(file, "pt")``; a corrupt or truncated file (or a tensor the file lacks) raises
    HFCheckpointError naming the file instead of safetensors' bare error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, "pt") as f:
            yield f
    except SafetensorError as exc:
        raise HFCheckpointError(f"{file}: cannot read safetensors file ({exc})") from exc


def read_hf_config(path: str) -> dict:
    """``path/config.json`` as a dict. Raises HFCheckpointError when missing or not JSON."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise HFCheckpointError(f"{cfg} not found: --hf-path must be an HF model directory")
    try:
        with open(cfg) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise HFCheckpointError(f"{cfg}: invalid JSON ({exc})") from exc


def safetensors_files(path: str) -> dict[str, str]:
    """Tensor name -> file for an HF directory (``model.safetensors`` or an index).

    Raises: HFCheckpointError when no weights are found or a shard named by the index is missing.
    """
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HFCheckpointError(f"{index}: not a safetensors index (no weight_map: "
                                    f"{exc!r})") from exc
        files = {}
        for name, shard in weight_map.items():
            full = os.path.join(path, shard)
            if not os.path.isfile(full):
                raise HFCheckpointError(f"{index} names shard {shard} (tensor {name}) but {full} "
                                        f"does not exist")
            files[name] = full
        return files
    single = os.path.join(path, SINGLE)
    if os.path.isfile(single):
        with open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    raise HFCheckpointError(f"no {SINGLE} or {INDEX} in {path}")


def iter_hf_tensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of an HF directory, one shard file open at a time."""
    by_file: dict[str, list] = {}
    for name, file in safetensors_files(path).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with open_safetensors(file) as f:
            for name in names:
                yield name, f.get_tensor(name)


def load_hf_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, in its stored dtype."""
    return dict(iter_hf_tensors(path))
