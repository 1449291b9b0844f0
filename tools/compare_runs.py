#!/usr/bin/env python3
"""Compare the per-iteration losses of training logs with a reference run's.

    python tools/compare_runs.py --reference runs/ref.log [--iterations 1-20] [--rtol 1e-3] \\
        "TP2 SP=runs/tp2_sp.log" runs/pp2.log ...

The flags, the log format and the exit status: ``megatron_hybrid/training/compare_runs.py``
(``python tools/compare_runs.py --help``).
"""
import sys

from megatron_hybrid.training.compare_runs import main

if __name__ == "__main__":
    sys.exit(main())
