"""Tiny tokenizers trained inside the tests (no files from outside the repository).

- ``tiny_hf_tokenizer``: a byte-level BPE ``tokenizer.json`` (``tokenizers`` library) with
  ``<|endoftext|>`` and ``<|pad|>`` special tokens: exact decode(encode(text)) round trips.
- ``tiny_sp_model``: a SentencePiece BPE ``.model`` trained on a few KB of text with the library's
  defaults (``</s>`` = 2, no pad piece).
"""
from __future__ import annotations

import pytest

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A tokenizer turns text into a sequence of integer ids.",
    "Megatron stores documents in an indexed dataset with a binary file and an index file.",
    "Each document ends with an end-of-document token when it is appended.",
    "Hybrid models mix gated delta rule layers with full attention layers.",
    "Numbers like 12345 and 2024 appear in text, as do symbols such as #, $ and %.",
    "Unicode text works too: café, naïve, Zürich, and 東京.",
]


def corpus_text(repeat: int = 40) -> list[str]:
    """About 20 KB of training lines: the sentences above with varied numbering."""
    return [f"{s} Line {i}." for i in range(repeat) for s in SENTENCES]


@pytest.fixture(scope="session")
def tiny_hf_tokenizer(tmp_path_factory):
    """Path of a byte-level BPE tokenizer.json (vocab 400; ids 0 and 1 are <|endoftext|>, <|pad|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus_text(), trainer=trainer)
    path = tmp_path_factory.mktemp("hf_tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_sp_model(tmp_path_factory):
    """Path of a SentencePiece BPE .model (vocab 400, byte fallback, defaults otherwise)."""
    import sentencepiece as spm

    prefix = tmp_path_factory.mktemp("sp_tok") / "tiny"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_text()), model_prefix=str(prefix),
                                   model_type="bpe", vocab_size=400, byte_fallback=True,
                                   num_threads=1, minloglevel=2)
    return str(prefix) + ".model"
