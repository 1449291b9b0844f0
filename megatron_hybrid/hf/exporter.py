"""Megatron checkpoint (any TP / PP) -> Hugging Face ``olmo_hybrid`` directory, streamed.

The checkpoint is read one decoder layer at a time (``DistCheckpointReader``); each layer is
mapped to the released tensor names (spec ``docs/model.md`` §6, ``hf.mapping``) and queued in a
safetensors shard that is written once it reaches ``max_shard_bytes``. Peak memory is about one
shard plus one layer, whatever the model size. Everything is written into a temporary directory
next to the target and renamed into place last, so a failed export leaves nothing behind.

Output: ``config.json`` and ``generation_config.json`` written by transformers'
``OlmoHybridConfig`` (the released keys; NoPE as ``rope_parameters: {"rope_theta": null}``),
safetensors (sharded with an index above the threshold), and tokenizer files when given.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

from megatron_hybrid.checkpoint.reader import DistCheckpointReader
from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.hf.mapping import config_to_hf, globals_megatron_to_hf, layer_megatron_to_hf
from megatron_hybrid.hf.safetensors_writer import ShardedSafetensorsWriter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: config.json keys that the writer sets itself, never copied from a source config
_OWN_KEYS = ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype")
#: tokenizer files copied from a tokenizer directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja")


@dataclass
class ExportResult:
    """What ``export_to_hf`` wrote."""

    path: str
    iteration: int
    dtype: torch.dtype
    files: list[str]
    num_tensors: int
    num_bytes: int
    seconds: float


def is_lossy_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether casting ``src`` to ``dst`` can change values (fp32->bf16/fp16, bf16<->fp16)."""
    if src == dst or dst == torch.float32 or dst == torch.float64:
        return False
    return True


def build_hf_config(cfg: OlmoHybridConfig, dtype: torch.dtype,
                   source: dict | None = None):
    """transformers ``OlmoHybridConfig`` for ``cfg`` (keys a source config.json had are kept).

    Args:
        source: the config.json the checkpoint was converted from (``run_config.yaml``'s
            ``source.hf_config``), whose extra keys (init ranges, ...) are carried over.
    Returns: the transformers config object (``save_pretrained`` writes config.json).
    """
    from transformers import OlmoHybridConfig as HFConfig

    fields = {k: v for k, v in (source or {}).items() if k not in _OWN_KEYS}
    fields.update(config_to_hf(cfg))
    nope = fields.get("rope_parameters") == {"rope_theta": None}
    if nope:
        fields.pop("rope_parameters")
    hf = HFConfig(**fields)
    if nope:  # docs/model.md §6 trap 4: None passed to the constructor becomes default RoPE
        hf.rope_parameters = None
    hf.dtype = str(dtype).replace("torch.", "")
    return hf


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copy tokenizer files from ``src`` (a directory, a ``tokenizer.json`` or a ``.model``).

    A bare ``tokenizer.json`` gets a minimal ``tokenizer_config.json`` naming
    ``PreTrainedTokenizerFast`` so ``AutoTokenizer`` loads it. Returns the names copied.
    Raises: FileNotFoundError when ``src`` does not exist or holds no tokenizer file.
    """
    if os.path.isdir(src):
        names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
        if not names:
            raise FileNotFoundError(f"--tokenizer-model {src}: no tokenizer files "
                                    f"({', '.join(TOKENIZER_FILES[:3])}, ...) in the directory")
        for n in names:
            shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
    elif os.path.isfile(src):
        name = "tokenizer.json" if src.endswith(".json") else os.path.basename(src)
        shutil.copy2(src, os.path.join(dst, name))
        names = [name]
    else:
        raise FileNotFoundError(f"--tokenizer-model {src}: no such file or directory")
    if "tokenizer.json" in names and "tokenizer_config.json" not in names:
        with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
        names.append("tokenizer_config.json")
    return names


def default_tokenizer(run_config: dict) -> str | None:
    """The checkpoint's tokenizer path when it is recorded and still exists, else None."""
    tok = run_config.get("tokenizer") or {}
    path = tok.get("tokenizer_model") or tok.get("model")
    kind = tok.get("tokenizer_type") or tok.get("type")
    if path and kind in ("HuggingFaceTokenizer", "SentencePieceTokenizer") and os.path.exists(path):
        return path
    return None


def prepare_output_dir(save: str) -> str:
    """Refuse a non-empty ``save``; return a temporary directory beside it.

    Raises: FileExistsError when ``save`` exists and is not an empty directory.
    """
    save = os.path.abspath(save)
    if os.path.exists(save) and (not os.path.isdir(save) or os.listdir(save)):
        raise FileExistsError(f"--save {save} exists and is not empty; choose a new directory")
    os.makedirs(os.path.dirname(save), exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(save)}.tmp-", dir=os.path.dirname(save))


def export_to_hf(load: str, save: str, iteration: int | None = None,
                 dtype: torch.dtype | None = None, tokenizer: str | None = None,
                 max_shard_bytes: int = 5 * 10 ** 9, progress: bool = True) -> ExportResult:
    """Write the model of checkpoint ``load`` as an HF ``olmo_hybrid`` directory ``save``.

    Args:
        dtype: tensor dtype of the output (default: the checkpoint's parameter dtype).
        tokenizer: tokenizer file/directory to copy (default: the checkpoint's HF tokenizer).
    Raises: CheckpointError for an unreadable checkpoint, FileExistsError for a non-empty
    ``save``, KeyError for a tensor the checkpoint lacks.
    """
    from tqdm import tqdm

    start = time.time()
    reader = DistCheckpointReader(load, iteration)
    cfg = reader.config
    src_dtype = reader.param_dtype()
    dtype = dtype or src_dtype
    if is_lossy_cast(src_dtype, dtype):
        warnings.warn(f"--dtype {dtype}: the checkpoint's parameters are {src_dtype}; the cast "
                      f"rounds them (lossy)", stacklevel=2)
    tokenizer = tokenizer or default_tokenizer(reader.run_config)
    tmp = prepare_output_dir(save)
    try:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        count = 0
        bar = tqdm(total=cfg.num_layers + 1, desc="export", unit="layer", disable=not progress)
        for i in range(cfg.num_layers):
            mg = reader.read_layer(i)
            for name, t in layer_megatron_to_hf(mg, i, cfg).items():
                writer.add(name, t.to(dtype))
                count += 1
            if mg:
                raise ValueError(f"{reader.path}: layer {i} tensors not mapped: {sorted(mg)}")
            bar.update(1)
        mg = reader.read(reader.global_keys())
        for name, t in globals_megatron_to_hf(mg, cfg).items():
            writer.add(name, t.to(dtype))
            count += 1
        bar.update(1)
        bar.close()
        files = writer.finish()
        source = (reader.run_config.get("source") or {}).get("hf_config")
        hf_config = build_hf_config(cfg, dtype, source)
        hf_config.save_pretrained(tmp)
        files.append("config.json")
        files += _write_generation_config(hf_config, tmp)
        if tokenizer:
            files += copy_tokenizer(tokenizer, tmp)
        save = os.path.abspath(save)
        publish_dir(tmp, save)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(save, reader.iteration, dtype, files, count, writer.total_bytes,
                        time.time() - start)


def publish_dir(tmp: str, save: str) -> None:
    """Give ``tmp`` (a private ``mkdtemp``) normal permissions and rename it to ``save``.

    ``save`` must be absent or an empty directory (checked by ``prepare_output_dir``).
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    save = os.path.abspath(save)
    if os.path.isdir(save):
        os.rmdir(save)
    os.replace(tmp, save)


def _write_generation_config(hf_config, directory: str) -> list[str]:
    from transformers import GenerationConfig

    gen = GenerationConfig.from_model_config(hf_config)
    gen.save_pretrained(directory)
    return ["generation_config.json"]
