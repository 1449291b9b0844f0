#!/usr/bin/env python3
"""Rewrite a megatron-hybrid training checkpoint for another TP / PP / DP layout, offline.

    python tools/reshard_checkpoint.py --load CKPT --save CKPT_tp1_pp2 \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 2

The flags and the logic: ``megatron_hybrid/checkpoint/reshard_cli.py`` (``--help``).
"""
import os
import sys

if __name__ == "__main__":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU workers over gloo, set before torch is imported
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from megatron_hybrid.checkpoint.reshard_cli import main

    sys.exit(main())
