"""Rewrite a megatron-hybrid training checkpoint for another TP / PP / DP layout, offline.

    python tools/reshard_checkpoint.py --load CKPT --save CKPT_tp1_pp2 \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 2

Needed for checkpoints whose optimizer state is ``dp_reshardable`` (saved with
``--no-dist-ckpt-optim-fully-reshardable``: it reshards over DP only); ``fully_reshardable`` ones
load at any layout directly, but can be rewritten too (e.g. into the other format). Runs on CPU
as local worker processes over gloo (TP x PP x DP of the source, then of the target), verifies the
result by loading it at the target layout (every model tensor, fp32 main param and Adam moment
bit-exact), then moves it into ``--save`` (same iteration; tracker last). Logic:
``megatron_hybrid/checkpoint/reshard.py``; ``tools/reshard_checkpoint.py`` runs ``main`` with
CUDA hidden (CUDA_VISIBLE_DEVICES='') and TorchDynamo off.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    """Command-line flags (``docs/design.md`` §6)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (holds the tracker)")
    p.add_argument("--save", required=True, help="output directory (new or empty)")
    p.add_argument("--target-tensor-parallel-size", type=int, required=True)
    p.add_argument("--target-pipeline-parallel-size", type=int, required=True)
    p.add_argument("--target-data-parallel-size", type=int, default=None,
                   help="default: the source's data-parallel size")
    p.add_argument("--iteration", type=int, default=None,
                   help="iteration to rewrite (default: the tracker's)")
    p.add_argument("--dist-ckpt-optim-fully-reshardable", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="target optimizer format: fully_reshardable (--dist-...) or "
                        "dp_reshardable (--no-dist-...); default: the source's")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Entry point: 0 on success, 1 with ``error: ...`` on stderr."""
    args = parse_args(argv)
    import warnings

    for message in (".*Transformer Engine and Apex are not installed.*",
                    ".*Apex is not installed.*", ".*`load_state_dict` is deprecated.*",
                    ".*full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=message)
    from megatron_hybrid.checkpoint.reshard import reshard_checkpoint
    from megatron_hybrid.checkpoint.storage import CheckpointError

    try:
        reshard_checkpoint(args.load, args.save, args.target_tensor_parallel_size,
                           args.target_pipeline_parallel_size, args.target_data_parallel_size,
                           args.iteration, args.dist_ckpt_optim_fully_reshardable,
                           log=lambda msg: print(f"[reshard] {msg}", flush=True))
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 1
    return 0
