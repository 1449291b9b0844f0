"""Convert a megatron-hybrid checkpoint (any TP / PP) into a Hugging Face ``olmo_hybrid`` directory.

    python tools/convert_megatron_to_hf.py --load runs/quickstart/checkpoints --save hf_out \\
        [--iteration 100] [--dtype bf16] [--tokenizer-model tokenizer.json] [--skip-validation]

Writes ``config.json`` and ``generation_config.json`` (as transformers writes them for the
released model), safetensors with the released tensor names (spec ``docs/model.md`` §6; sharded
with ``model.safetensors.index.json`` above ``--max-shard-size``) and the tokenizer files. The
checkpoint is streamed one layer at a time. Then, unless ``--skip-validation``, the result is
loaded with transformers and the same tokens are run through both models (fp32, one model in
memory at a time); the tool fails when max |dlogits| exceeds ``--validation-tolerance``.
"""
from __future__ import annotations

import argparse
import sys

DTYPES = ("fp32", "bf16", "fp16")


def parse_args(argv=None):
    """Command-line flags (``docs/design.md`` §6)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True,
                   help="checkpoint directory (holding latest_checkpointed_iteration.txt)")
    p.add_argument("--save", required=True, help="output HF directory (new or empty)")
    p.add_argument("--iteration", type=int, default=None, help="default: the tracker's")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="tensor dtype of the output (default: the checkpoint's parameter dtype)")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer.json / tokenizer directory / SentencePiece .model to copy "
                        "(default: the checkpoint's HF tokenizer when recorded)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="safetensors shard size limit, e.g. 5GB, 500MB (default: 5GB)")
    p.add_argument("--skip-validation", action="store_true",
                   help="do not compare logits against transformers")
    p.add_argument("--validation-tolerance", type=float, default=1e-3,
                   help="largest max |dlogits| accepted (fp32 compute; default: 1e-3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def convert(args) -> int:
    """Export, then validate; returns the exit status (0 ok, 1 validation failed)."""
    import torch

    from megatron_hybrid.hf.converter_cli import peak_rss_gb
    from megatron_hybrid.hf.exporter import export_to_hf
    from megatron_hybrid.hf.safetensors_writer import parse_size

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    res = export_to_hf(args.load, args.save, args.iteration, dtype, args.tokenizer_model,
                       parse_size(args.max_shard_size), progress=not args.no_progress)
    print(f"[convert] iteration {res.iteration} -> {res.path}: {res.num_tensors} tensors, "
          f"{res.num_bytes / 1e9:.3f} GB {str(res.dtype).replace('torch.', '')}, "
          f"files {', '.join(res.files)} ({res.seconds:.1f} s, peak RSS {peak_rss_gb():.2f} GB)",
          flush=True)
    if args.skip_validation:
        print("[convert] validation skipped (--skip-validation)", flush=True)
        return 0
    from megatron_hybrid.hf.validate import compare_logits

    cmp = compare_logits(args.load, res.path, res.iteration, round_to=res.dtype)
    ok = cmp.max_abs_diff <= args.validation_tolerance
    print(f"[validate] Megatron vs transformers: {cmp.summary()}: "
          f"{'OK' if ok else 'FAILED'} (tolerance {args.validation_tolerance:g})", flush=True)
    if not ok:
        print(f"error: the converted model's logits differ from the checkpoint's by "
              f"{cmp.max_abs_diff:.3e} > --validation-tolerance {args.validation_tolerance:g}; "
              f"{res.path} is kept for inspection", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    """Entry point: 0 on success, 1 with ``error: ...`` on stderr."""
    from megatron_hybrid.hf.converter_cli import run_converter

    return run_converter(convert, parse_args(argv))
