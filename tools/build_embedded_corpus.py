#!/usr/bin/env python3
"""Build the embedded default dataset from the running Python's standard library (no download).

    python tools/build_embedded_corpus.py                 # -> data/embedded/ under the repo root

The flags and the logic: ``megatron_hybrid/data/embedded_cli.py`` (``--help``).
"""
import sys

from megatron_hybrid.data.embedded_cli import main

if __name__ == "__main__":
    sys.exit(main())
