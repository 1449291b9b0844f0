#!/usr/bin/env python3
"""Run token ids through a megatron-hybrid checkpoint and save fp32 logits.

    torchrun --nproc-per-node 4 tools/dump_logits.py --load CKPT --input-ids IDS.npy \\
        --output LOGITS.npy --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

The flags and the logic: ``megatron_hybrid/checkpoint/dump_logits.py`` (``--help``).
"""
import sys

from megatron_hybrid.checkpoint.dump_logits import main

if __name__ == "__main__":
    sys.exit(main())
