"""Session-wide fixtures shared across test packages.

- ``embedded_small``: a small embedded default (``megatron_hybrid.data.embedded``), built once per
  session into a temporary directory: ~300k characters of standard-library text, a 1024-piece
  SentencePiece BPE tokenizer, ``corpus_text_document.bin/.idx`` with eod appended.
- ``dolma2_tokenizer``: path of the real dolma2 ``tokenizer.json`` in ``../shared/data`` (never
  copied into the repository); the test is skipped when it is absent.
"""
from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
EMBEDDED_SMALL_CHARS = 300_000
EMBEDDED_SMALL_VOCAB = 1024


@pytest.fixture(scope="session")
def embedded_small(tmp_path_factory):
    """EmbeddedDefault of a small build (max_chars=300k, vocab 1024) in a session temp dir."""
    from megatron_hybrid.data.embedded import build_embedded_default

    out = tmp_path_factory.mktemp("embedded_small")
    return build_embedded_default(str(out), vocab_size=EMBEDDED_SMALL_VOCAB,
                                  max_chars=EMBEDDED_SMALL_CHARS)


@pytest.fixture(scope="session")
def dolma2_tokenizer():
    """Path of the dolma2 tokenizer.json under ../shared/data; skips when absent."""
    for name in ("dolma2_tokenizer.json", "tokenizer.json"):
        path = os.path.join(SHARED_DATA, name)
        if os.path.isfile(path):
            return path
    pytest.skip(f"dolma2 tokenizer not found in {SHARED_DATA}")
