"""Hugging Face ``olmo_hybrid`` directory -> megatron-hybrid dist checkpoint, streamed.

The model is built once at TP = PP = 1 without initialization (``torch.empty``: pages are only
touched when filled), then filled one decoder layer at a time: the layer's HF tensors are read
from their safetensors files (opened per layer, so at most one layer of file pages is mapped),
mapped to the Megatron global layout (``hf.mapping``) and copied into the parameters. Peak memory
is the model plus one layer. The checkpoint stores tensors in their global layout, so it loads
at any TP / PP; the target layout is validated and recorded as the checkpoint's default.

Accepted inputs (spec ``docs/model.md`` §6): ``model.safetensors`` or a sharded index, the
released names, fused ``linear_attn.conv1d``, the aliases of trap 3, bf16 / fp16 / fp32.
"""
from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch

from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.hf.exporter import is_lossy_cast, prepare_output_dir
from megatron_hybrid.hf.io import open_safetensors, read_hf_config, safetensors_files
from megatron_hybrid.hf.mapping import (
    GLOBAL_NAMES,
    canonical_hf_name,
    config_from_hf,
    global_hf_to_megatron,
    layer_hf_to_megatron,
)

_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "F64": torch.float64}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass
class ImportResult:
    """What ``import_from_hf`` wrote."""

    path: str
    config: OlmoHybridConfig
    dtype: torch.dtype
    num_tensors: int
    seconds: float


class HFTensorSource:
    """The tensors of an HF directory, grouped by decoder layer, read lazily.

    Names are canonicalised (``canonical_hf_name``) so aliases are interpreted once.
    Raises (constructor): HFCheckpointError for missing weights or a missing shard.
    """

    def __init__(self, path: str):
        self.path = path
        self.files: dict[str, str] = {}  # canonical name -> file
        self.original: dict[str, str] = {}  # canonical name -> name in the files
        for name, file in safetensors_files(path).items():
            canon = canonical_hf_name(name)
            self.files[canon], self.original[canon] = file, name
        self.by_layer: dict[int | None, list[str]] = defaultdict(list)
        for canon in self.files:
            m = _LAYER.match(canon)
            self.by_layer[int(m.group(1)) if m else None].append(canon)

    def dtypes(self) -> dict[str, torch.dtype]:
        """Canonical name -> stored dtype, read from the safetensors headers only."""
        out = {}
        by_file = defaultdict(list)
        for canon, file in self.files.items():
            by_file[file].append(canon)
        for file, names in by_file.items():
            with open_safetensors(file) as f:
                for canon in names:
                    code = f.get_slice(self.original[canon]).get_dtype()
                    out[canon] = _SAFETENSORS_DTYPES.get(code, code)
        return out

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors by canonical name (each file opened once for the call, then closed)."""
        by_file = defaultdict(list)
        for canon in names:
            by_file[self.files[canon]].append(canon)
        out = {}
        for file, group in by_file.items():
            with open_safetensors(file) as f:
                for canon in group:
                    out[canon] = f.get_tensor(self.original[canon])
        return out


def choose_dtype(stored: dict[str, torch.dtype], requested: torch.dtype | None,
                 path: str) -> torch.dtype:
    """The checkpoint parameter dtype: ``requested``, else the one dtype all tensors share.

    Warns when the cast is lossy. Raises ValueError for mixed dtypes without ``requested``
    (never cast implicitly, docs/model.md §6 trap 7).
    """
    kinds = set(stored.values())
    if requested is None:
        if len(kinds) != 1:
            raise ValueError(f"{path} mixes tensor dtypes {sorted(map(str, kinds))}; pass "
                             f"--dtype to choose the checkpoint's parameter dtype")
        return kinds.pop()
    lossy = sorted(str(k) for k in kinds if is_lossy_cast(k, requested))
    if lossy:
        warnings.warn(f"--dtype {requested}: casting {', '.join(lossy)} tensors of {path} "
                      f"rounds them (lossy)", stacklevel=2)
    return requested


def import_from_hf(hf_path: str, save: str, tp: int = 1, pp: int = 1,
                   dtype: torch.dtype | None = None, tokenizer: str | None = None,
                   make_vocab_size_divisible_by: int = 128,
                   progress: bool = True) -> ImportResult:
    """Convert HF directory ``hf_path`` into checkpoint ``save``/iter_0000000 (no optimizer).

    Args:
        tp, pp: the target layout (validated against the model; recorded as the default).
        dtype: parameter dtype (default: the HF tensors' dtype).
        tokenizer: recorded in ``run_config.yaml`` (default: ``hf_path`` if it holds
            ``tokenizer.json``).
    Raises: ConfigError (model_type, layout), HFCheckpointError (files), KeyError (missing
    tensor), ValueError (shape mismatch naming the tensor and both shapes, unused tensors),
    FileExistsError (a non-empty ``save``).
    """
    from tqdm import tqdm

    from megatron_hybrid.checkpoint.storage import save_checkpoint
    from megatron_hybrid.model import OlmoHybridModel
    from megatron_hybrid.parallel import initialize_distributed

    start = time.time()
    hf_config = read_hf_config(hf_path)
    cfg = config_from_hf(hf_config, make_vocab_size_divisible_by)
    cfg.validate_parallel(tp, pp)
    source = HFTensorSource(hf_path)
    dtype = choose_dtype(source.dtypes(), dtype, hf_path)
    tmp = prepare_output_dir(save)
    try:
        initialize_distributed(1, 1)
        model = OlmoHybridModel(cfg, cfg.to_transformer_config(
            1, 1, params_dtype=dtype, perform_initialization=False, use_cpu_initialization=True))
        params = model.state_dict(keep_vars=True)
        filled = set()
        bar = tqdm(total=cfg.num_layers + 1, desc="import", unit="layer", disable=not progress)
        for i in range(cfg.num_layers):
            hf = source.read(source.by_layer.pop(i, []))
            for key, t in layer_hf_to_megatron(hf, i, cfg).items():
                _fill(params, key, t)
                filled.add(key)
            if hf:
                raise ValueError(f"{hf_path}: tensors the config does not use: "
                                 f"{sorted(source.original[k] for k in hf)[:8]}")
            del hf
            bar.update(1)
        _fill_globals(source, params, filled, cfg, hf_path)
        bar.update(1)
        bar.close()
        if source.by_layer:  # layers beyond num_hidden_layers
            extra = sorted(source.original[n] for names in source.by_layer.values()
                           for n in names)
            raise ValueError(f"{hf_path}: tensors of layers beyond num_hidden_layers="
                             f"{cfg.num_layers}: {extra[:8]}")
        _check_all_filled(params, filled, cfg)
        tok = tokenizer or (hf_path if os.path.isfile(os.path.join(hf_path, "tokenizer.json"))
                            else None)
        extra_config = {"tokenizer": {"tokenizer_model": tok and os.path.abspath(tok),
                                      "tokenizer_type": "HuggingFaceTokenizer"},
                        "source": {"hf_path": os.path.abspath(hf_path), "hf_config": hf_config},
                        "has_optimizer_state": False}
        save_checkpoint(tmp, 0, model, cfg, extra_config=extra_config,
                        default_layout={"tensor_model_parallel_size": tp,
                                        "pipeline_model_parallel_size": pp,
                                        "data_parallel_size": 1, "context_parallel_size": 1})
        del model, params
        save = os.path.abspath(save)
        os.makedirs(save, exist_ok=True)
        os.replace(os.path.join(tmp, "iter_0000000"), os.path.join(save, "iter_0000000"))
        os.replace(os.path.join(tmp, "latest_checkpointed_iteration.txt"),
                   os.path.join(save, "latest_checkpointed_iteration.txt"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportResult(save, cfg, dtype, len(filled), time.time() - start)


def _fill_globals(source: HFTensorSource, params: dict[str, torch.Tensor], filled: set,
                  cfg: OlmoHybridConfig, hf_path: str) -> None:
    """Embedding, final norm and LM head, read one tensor at a time (the largest tensors)."""
    names = source.by_layer.pop(None, [])
    unused = sorted(source.original[n] for n in names if n not in GLOBAL_NAMES)
    if unused:
        raise ValueError(f"{hf_path}: tensors the config does not use: {unused[:8]}")
    for name in GLOBAL_NAMES:
        if name not in names:
            if name == "lm_head.weight" and not cfg.untie_embeddings_and_output_weights:
                continue
            raise KeyError(f"HF checkpoint {hf_path} is missing tensor {name!r}")
        t = source.read([name])[name]
        mapped = global_hf_to_megatron(name, t, cfg,
                                       embedding=params["embedding.word_embeddings.weight"])
        if mapped is not None:
            _fill(params, *mapped)
            filled.add(mapped[0])
        del t, mapped


def _fill(params: dict[str, torch.Tensor], key: str, t: torch.Tensor) -> None:
    """Copy global tensor ``t`` into the TP = PP = 1 model parameter of the same key."""
    if key not in params:
        raise KeyError(f"the model has no parameter {key!r} (converter mapping error)")
    p = params[key]
    if tuple(p.shape) != tuple(t.shape):
        raise ValueError(f"tensor {key!r}: converted shape {tuple(t.shape)} vs model "
                         f"{tuple(p.shape)}")
    with torch.no_grad():
        p.copy_(t)


def _check_all_filled(params: dict[str, torch.Tensor], filled: set,
                      cfg: OlmoHybridConfig) -> None:
    skip = {"output_layer.weight"} if not cfg.untie_embeddings_and_output_weights else set()
    missing = [k for k in params if k not in filled and not k.endswith("_extra_state")
               and k not in skip]
    if missing:
        raise KeyError(f"model parameters not filled from the HF files: {missing[:8]}")
