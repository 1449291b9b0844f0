#!/usr/bin/env python3
"""Benchmark both checkpoint conversions at the real Olmo Hybrid 7B widths on the CPU.

    python tools/bench_conversion.py --num-layers 4 --work-dir /tmp/bench_conv

The flags and the logic: ``megatron_hybrid/benchmark/conversion.py`` (``--help``).
"""
import sys

from megatron_hybrid.benchmark.conversion import main

if __name__ == "__main__":
    sys.exit(main())
