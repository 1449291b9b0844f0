#!/usr/bin/env python3
"""Convert a Hugging Face ``olmo_hybrid`` directory into a megatron-hybrid dist checkpoint.

    python tools/convert_hf_to_megatron.py --hf-path HF_DIR --save OUT_DIR \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2

The flags and the logic: ``megatron_hybrid/hf/import_cli.py`` (``--help``).
"""
import sys

from megatron_hybrid.hf.import_cli import main

if __name__ == "__main__":
    sys.exit(main())
