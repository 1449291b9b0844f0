"""Run token ids through a megatron-hybrid checkpoint and save fp32 logits.

    torchrun --nproc-per-node 4 tools/dump_logits.py --load CKPT --input-ids IDS.npy \\
        --output LOGITS.npy --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

``IDS.npy``: int64 ``[B, T]``. ``LOGITS.npy``: float32 ``[B, T, V]`` with V the model's
``vocab_size`` as its HF config states it (Megatron's padding rows are dropped). Any TP / PP works
(the checkpoint is resharded on load); without the flags the layout is the checkpoint's recorded
default when the world size matches it, else TP = 1 and PP = the world size.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    """Command-line flags (``docs/design.md`` §6)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--iteration", type=int, default=None, help="default: the tracker's")
    p.add_argument("--input-ids", required=True, help=".npy int64 [B, T]")
    p.add_argument("--output", required=True, help=".npy float32 [B, T, V]")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None)
    return p.parse_args(argv)


def _layout(args, run_config):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp is None and pp is None:
        rec = run_config.get("parallel", {})
        rtp, rpp = rec.get("tensor_model_parallel_size", 1), rec.get("pipeline_model_parallel_size", 1)
        return (rtp, rpp) if rtp * rpp == world else (1, world)
    return tp or 1, pp or 1


def dump(args):
    """Load the checkpoint at the chosen layout, run the ids, write the logits (one rank writes).

    Raises: ValueError for bad ids / output path / layout, CheckpointError for a bad ``--load``.
    """
    import numpy as np
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_hybrid.checkpoint.storage import load_model_checkpoint, read_run_config
    from megatron_hybrid.config import OlmoHybridConfig
    from megatron_hybrid.forward import forward_logits
    from megatron_hybrid.model import OlmoHybridModel
    from megatron_hybrid.parallel import initialize_distributed

    run_config = read_run_config(args.load, args.iteration)
    cfg = OlmoHybridConfig.from_dict(run_config["model"])
    tp, pp = _layout(args, run_config)
    cfg.validate_parallel(tp, pp)
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise ValueError(f"--output {args.output}: directory does not exist")
    try:
        ids = np.load(args.input_ids, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"--input-ids {args.input_ids}: not a .npy integer array ({exc})") from exc
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or 0 in ids.shape:
        raise ValueError(f"--input-ids {args.input_ids}: expected an integer array [B, T], got "
                         f"{ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(f"--input-ids {args.input_ids}: ids must be in [0, {cfg.vocab_size}), "
                         f"found [{ids.min()}, {ids.max()}]")
    info = initialize_distributed(tp, pp)
    model = OlmoHybridModel(cfg, cfg.to_transformer_config(
        tp, pp, perform_initialization=False))
    model.to(info.device)
    it = load_model_checkpoint(args.load, model, args.iteration)
    ids_t = torch.from_numpy(ids.astype(np.int64)).to(info.device)
    logits = forward_logits(model, ids_t, micro_batch_size=args.micro_batch_size,
                            vocab_size=cfg.vocab_size)
    if (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0):
        tmp = args.output + ".tmp.npy"
        np.save(tmp, logits.cpu().numpy().astype(np.float32))
        os.replace(tmp, args.output)
        print(f"[dump_logits] iteration {it}, TP={tp} PP={pp}: wrote {args.output} "
              f"{tuple(logits.shape)}", flush=True)
    if dist.is_initialized():
        dist.barrier()


def main(argv=None):
    """Entry point: 0 on success, 1 with ``error: ...`` on stderr."""
    args = parse_args(argv)
    try:
        dump(args)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        # KeyError's str() is the repr of its message: print the message itself
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 1
    return 0
