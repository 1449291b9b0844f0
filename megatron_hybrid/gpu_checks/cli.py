"""``tools/gpu_check.py <check> [options]``: one entry point for the GPU checks (docs/gpu.md).

Each check is a module of this package with a ``main(argv)``; ``<check> --help`` lists its flags.
"""
from __future__ import annotations

import importlib
import sys

#: subcommand -> (module of megatron_hybrid.gpu_checks, what it checks)
CHECKS = {
    "gdn": ("gdn", "the GDN layer at the 7B shape, fla vs PyTorch, and the Hopper self-check"),
    "training": ("training", "the acceptance training run on the embedded corpus (save, relaunch, reload)"),
    "features": ("features", "every training feature flag, one short olmo_hybrid_1b run per row"),
    "benchmark": ("benchmark", "tools/benchmark.py with a time budget"),
    "long-context": ("long_context", "32K and 64K sequences at the 7B widths"),
    "tuner": ("tuner", "the tuner's predictions against measurements, one-GPU plans of the 1B"),
    "multi-gpu": ("multi_gpu", "every parallel layout against one GPU, a checkpoint across layouts, scaling"),
}


def usage() -> str:
    lines = ["usage: gpu_check.py <check> [options]   (gpu_check.py <check> --help: its options)", "",
             "checks:"]
    lines += [f"  {name:13s} {what}" for name, (_, what) in CHECKS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the named check; its exit status (2 with the usage for an unknown one)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in CHECKS:
        print(f"gpu_check.py: error: unknown check {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"megatron_hybrid.gpu_checks.{CHECKS[argv[0]][0]}")
    return module.main(argv[1:])
