#!/usr/bin/env python3
"""Convert a Hugging Face ``olmo_hybrid`` directory into a megatron-hybrid dist checkpoint.

    python tools/convert_hf_to_megatron.py --hf-path HF_DIR --save OUT_DIR \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2

Writes ``OUT_DIR/iter_0000000`` (megatron-core ``torch_dist``, no optimizer state) with
``run_config.yaml`` and the tracker file (``design.md`` §7). The checkpoint stores tensors in their
global layout, so it loads at any TP / PP; the target layout is validated against the model
(TP must divide heads, GDN heads, FFN and the padded vocabulary) and recorded as its default.
Tensors keep the HF dtype unless ``--dtype`` says otherwise (bf16 -> fp32 is exact).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None):
    """Command-line flags (``design.md`` §6)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-path", required=True, help="HF model directory (config.json, safetensors)")
    p.add_argument("--save", required=True, help="output checkpoint directory")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype of the checkpoint (default: the HF tensors' dtype)")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer recorded in run_config.yaml (default: --hf-path if it holds "
                        "tokenizer.json)")
    return p.parse_args(argv)


def convert(args) -> str:
    """Convert ``--hf-path`` into ``--save``/iter_0000000; returns ``--save``.

    Raises: ConfigError / ValueError / KeyError for a model or layout the converter cannot map,
    HFCheckpointError for unreadable HF files.
    """
    import torch

    from megatron_hybrid.checkpointing import save_checkpoint
    from megatron_hybrid.hf_io import load_hf_state_dict, read_hf_config
    from megatron_hybrid.hf_mapping import config_from_hf, hf_to_megatron, load_global_into_model
    from megatron_hybrid.model import OlmoHybridModel
    from megatron_hybrid.parallel import initialize_distributed

    cfg = config_from_hf(read_hf_config(args.hf_path), args.make_vocab_size_divisible_by)
    tp, pp = args.target_tensor_parallel_size, args.target_pipeline_parallel_size
    cfg.validate_parallel(tp, pp)
    hf_sd = load_hf_state_dict(args.hf_path)
    dtypes = {t.dtype for t in hf_sd.values()}
    if args.dtype:
        dtype = getattr(torch, DTYPES[args.dtype])
    elif len(dtypes) == 1:
        dtype = dtypes.pop()
    else:  # never cast implicitly (spec §6 trap 7)
        raise ValueError(f"{args.hf_path} mixes tensor dtypes {sorted(map(str, dtypes))}; pass "
                         f"--dtype to choose the checkpoint's parameter dtype")
    print(f"[convert] {args.hf_path}: {cfg.num_layers} layers ({cfg.hybrid_layer_pattern}), "
          f"d={cfg.hidden_size}, vocab {cfg.vocab_size} -> {cfg.padded_vocab_size} rows, "
          f"dtype {dtype}", flush=True)
    initialize_distributed(1, 1)
    model = OlmoHybridModel(cfg, cfg.to_transformer_config(1, 1, params_dtype=dtype,
                                                           perform_initialization=False))
    load_global_into_model(model, hf_to_megatron(hf_sd, cfg), cfg)
    tokenizer = args.tokenizer_model or (
        args.hf_path if os.path.isfile(os.path.join(args.hf_path, "tokenizer.json")) else None)
    # write next to the target, then move into place: a failed run leaves no half checkpoint
    os.makedirs(os.path.dirname(os.path.abspath(args.save)) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(os.path.abspath(args.save)))
    try:
        save_checkpoint(tmp, 0, model, cfg,
                        extra_config={"tokenizer": {"model": tokenizer,
                                                    "type": "HuggingFaceTokenizer"},
                                      "source": {"hf_path": os.path.abspath(args.hf_path)}},
                        default_layout={"tensor_model_parallel_size": tp,
                                        "pipeline_model_parallel_size": pp,
                                        "data_parallel_size": 1, "context_parallel_size": 1})
        os.makedirs(args.save, exist_ok=True)
        target = os.path.join(args.save, "iter_0000000")
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(os.path.join(tmp, "iter_0000000"), target)
        os.replace(os.path.join(tmp, "latest_checkpointed_iteration.txt"),
                   os.path.join(args.save, "latest_checkpointed_iteration.txt"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[convert] wrote {os.path.join(args.save, 'iter_0000000')} (default layout TP={tp} "
          f"PP={pp})", flush=True)
    return args.save


def main(argv=None):
    """Entry point: 0 on success, 1 with ``error: ...`` on stderr."""
    args = parse_args(argv)
    try:
        convert(args)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
