"""Data: tokenizers, preprocessing into megatron-core indexed datasets, the embedded default corpus.

Command lines: ``preprocess_cli`` (``tools/preprocess_data.py``), ``embedded_cli``
(``tools/build_embedded_corpus.py``).
"""
