#!/usr/bin/env python3
"""Rank parallel layouts for Olmo Hybrid training by predicted memory and throughput.

    python tools/tune_parallelism.py --model-preset olmo_hybrid_7b --num-gpus 64 \\
        --gpu-memory-gb 80 --seq-length 4096 --global-batch-size 1024 --explain

Searches TP / PP (even and balanced uneven stages) / DP / micro-batch / recompute / distributed
optimizer and context parallelism (head-parallel all-to-all), prints a ranked table (memory per GPU,
tokens/s/GPU, MFU; plans that do not fit or are refused with the reason), ``--explain [RANK]``
the breakdown of one plan and launch flags for ``examples/train_olmo_hybrid_7b.sh``;
``--measure`` runs the best plans with ``--mock-data`` on this machine and compares.
Pin a dimension with Megatron's flag (``--tensor-model-parallel-size 2`` ...). The model lives in
``megatron_hybrid/tuner/``.
"""
import sys

if __name__ == "__main__":
    from megatron_hybrid.tuner.cli import main

    sys.exit(main())
