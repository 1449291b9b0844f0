#!/usr/bin/env python3
"""Tokenize text into a megatron-core indexed dataset (Megatron-LM's flag names).

    python tools/preprocess_data.py --input docs.jsonl --output-prefix data/my \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model ../shared/data/dolma2_tokenizer.json \\
        --append-eod --workers 2

The flags and the logic: ``megatron_hybrid/data/preprocess_cli.py`` (``--help``).
"""
import sys

from megatron_hybrid.data.preprocess_cli import main

if __name__ == "__main__":
    sys.exit(main())
