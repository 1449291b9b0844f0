#!/usr/bin/env python3
"""The GPU checks: ``python tools/gpu_check.py <check> [options]`` (``--help`` lists the checks).

    python tools/gpu_check.py features --out /tmp/out --rows 7,11,12 --budget-s 540 --pack-logs
    python tools/gpu_check.py multi-gpu --dry-run --num-gpus 8

Checks: gdn, training, features, benchmark, long-context, tuner, multi-gpu; each has ``--dry-run``
(or ``--cpu`` / ``--cpu-smoke``). The drivers: ``megatron_hybrid/gpu_checks/``; docs/gpu.md.
"""
import sys

from megatron_hybrid.gpu_checks.cli import main

if __name__ == "__main__":
    sys.exit(main())
