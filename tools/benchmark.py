#!/usr/bin/env python3
"""Training throughput of Olmo Hybrid on one GPU: ours vs HF transformers vs megatron-core's GDN.

    python tools/benchmark.py                      # H200: 8 layers of the 7B, S 8192, bf16
    python tools/benchmark.py --max-minutes 6.5 --profile --output-md docs/performance.md
    python tools/benchmark.py --smoke              # CPU check: tiny shapes, fp32, torch kernels

Writes the results JSON (``--output-json``, default runs/benchmark/benchmark.json) and the
markdown table (``--output-md``, default docs/performance.md); prints the table last. See
``megatron_hybrid/benchmark/__init__.py`` for what is measured and ``tools/gpu_check.py benchmark``
for the GPU command.
"""
import sys

from megatron_hybrid.benchmark.cli import main

if __name__ == "__main__":
    results = main()
    failed = [n for n, e in results["engines"].items() if e.get("status") == "failed"]
    sys.exit(1 if failed else 0)
