"""Convert a Hugging Face ``olmo_hybrid`` directory into a megatron-hybrid dist checkpoint.

    python tools/convert_hf_to_megatron.py --hf-path HF_DIR --save OUT_DIR \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2

Streams one decoder layer at a time (peak memory: the model plus one layer). Accepts
``model.safetensors`` or a sharded index, the released tensor names, fused convs and the aliases
of spec ``docs/model.md`` §6. Writes ``OUT_DIR/iter_0000000`` (megatron-core ``torch_dist``, no
optimizer state) with ``run_config.yaml`` and the tracker file (``docs/design.md`` §7). The checkpoint
stores tensors in their global layout, so it loads at any TP / PP; the target layout is validated
against the model (TP must divide heads, GDN heads, FFN and the padded vocabulary) and recorded
as its default.
Tensors keep the HF dtype unless ``--dtype`` says otherwise (bf16 -> fp32 is exact).
"""
from __future__ import annotations

import argparse
import os

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None):
    """Command-line flags (``docs/design.md`` §6)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-path", required=True, help="HF model directory (config.json, safetensors)")
    p.add_argument("--save", required=True, help="output checkpoint directory")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype of the checkpoint (default: the HF tensors' dtype)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer recorded in run_config.yaml (default: --hf-path if it holds "
                        "tokenizer.json)")
    return p.parse_args(argv)


def convert(args) -> int:
    """Convert ``--hf-path`` into ``--save``/iter_0000000 (streamed); returns 0.

    Raises: ConfigError / ValueError / KeyError for a model or layout the converter cannot map,
    HFCheckpointError for unreadable HF files, FileExistsError for a non-empty ``--save``.
    """
    import torch

    from megatron_hybrid.hf.converter_cli import peak_rss_gb
    from megatron_hybrid.hf.importer import import_from_hf

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    res = import_from_hf(args.hf_path, args.save, args.target_tensor_parallel_size,
                         args.target_pipeline_parallel_size, dtype, args.tokenizer_model,
                         args.make_vocab_size_divisible_by, progress=not args.no_progress)
    cfg = res.config
    print(f"[convert] {args.hf_path}: {cfg.num_layers} layers ({cfg.hybrid_layer_pattern}), "
          f"d={cfg.hidden_size}, vocab {cfg.vocab_size} -> {cfg.padded_vocab_size} rows, "
          f"{str(res.dtype).replace('torch.', '')}: wrote "
          f"{os.path.join(res.path, 'iter_0000000')} ({res.num_tensors} tensors, default layout "
          f"TP={args.target_tensor_parallel_size} PP={args.target_pipeline_parallel_size}, "
          f"{res.seconds:.1f} s, peak RSS {peak_rss_gb():.2f} GB)", flush=True)
    return 0


def main(argv=None):
    """Entry point: 0 on success, 1 with ``error: ...`` on stderr."""
    from megatron_hybrid.hf.converter_cli import run_converter

    return run_converter(convert, parse_args(argv))
