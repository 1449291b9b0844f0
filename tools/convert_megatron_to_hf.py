#!/usr/bin/env python3
"""Convert a megatron-hybrid checkpoint (any TP / PP) into a Hugging Face ``olmo_hybrid`` directory.

    python tools/convert_megatron_to_hf.py --load runs/quickstart/checkpoints --save hf_out \\
        [--iteration 100] [--dtype bf16] [--tokenizer-model tokenizer.json] [--skip-validation]

The flags and the logic: ``megatron_hybrid/hf/export_cli.py`` (``--help``).
"""
import sys

from megatron_hybrid.hf.export_cli import main

if __name__ == "__main__":
    sys.exit(main())
