"""The embedded default: stdlib text extraction rules on a synthetic tree, the small session
build read back with megatron-core, the manifest fast path and determinism."""
from __future__ import annotations

import json
import os
import textwrap
import time

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_hybrid.data import stdlib_corpus
from megatron_hybrid.data.embedded import MANIFEST_FILE, build_embedded_default, load_embedded_default
from megatron_hybrid.data.tokenizer import build_tokenizer

MODULE_DOC = ("Module docstring long enough to be kept: it explains what the module is for, "
              "in plain English sentences.")
FUNC_DOC = ("Return the answer after thinking about it for a while.\n\n"
            "The result is computed carefully and returned to the caller as an integer.")
PARA1 = ("A comment paragraph that runs over two lines and says something useful "
         "about the code below it.")
PARA2 = "A second paragraph of the same run of comments, long enough to pass the length filter."
TOPIC_A = "Topic A: the language reference explains how names are bound in a block of code."
TOPIC_B = "Topic B: the language reference explains how the import statement finds modules."

SOURCE = f'''\
"""{MODULE_DOC}"""
import sys
sys.exit("this module must never be imported")
# A comment paragraph that runs over two lines and says something useful
# about the code below it.
#
# A second paragraph of the same run of comments, long enough to pass the length filter.
x = 1  # a trailing comment after code is ignored even when it is quite long, like this one.


class C:
    """Short."""

    def f(self):
        """{textwrap.indent(FUNC_DOC, "        ").strip()}"""


# Copyright (c) 2001 Someone Somewhere. All rights reserved. Licensed under the Example License.
def g():
    """>>> g()
    1
    >>> [g() for _ in range(3)]
    [1, 1, 1]
    """


def h():
    """{MODULE_DOC}"""
'''


def make_tree(root):
    (root / "test").mkdir(parents=True)
    (root / "idlelib").mkdir()
    (root / "pydoc_data").mkdir()
    (root / "mod_a.py").write_text(SOURCE)
    (root / "zz_broken.py").write_text('"""A docstring in a file that does not parse at all."""\ndef (')
    skipped = f'"""{MODULE_DOC} (from a directory that is skipped)"""\n'
    (root / "test" / "test_x.py").write_text(skipped)
    (root / "idlelib" / "tool.py").write_text(skipped)
    (root / "pydoc_data" / "topics.py").write_text(
        "raise SystemExit('never imported')\n"
        f"topics = {{'b': {TOPIC_B!r}, 'a': {TOPIC_A!r}, 'c': 'too short'}}\n")


def test_extraction_rules(tmp_path):
    make_tree(tmp_path)
    docs = list(stdlib_corpus.iter_documents(str(tmp_path)))
    assert docs == [
        {"text": "\n\n".join([MODULE_DOC, PARA1, PARA2, FUNC_DOC]), "source": "mod_a.py"},
        {"text": TOPIC_A, "source": "pydoc_data/topics.py#a"},
        {"text": TOPIC_B, "source": "pydoc_data/topics.py#b"},
    ]
    capped = list(stdlib_corpus.iter_documents(str(tmp_path), max_chars=10))
    assert capped == docs[:1]


def test_block_filter():
    prose = "This function returns the number of items that are stored in the container object."
    assert stdlib_corpus.keep_block(prose)
    assert not stdlib_corpus.keep_block("Return the number of items.")  # short
    assert not stdlib_corpus.keep_block(prose + " Copyright 2001 Python Software Foundation.")
    assert not stdlib_corpus.keep_block(
        "Permission is hereby granted, free of charge, to any person obtaining a copy of this.")
    code = "x = foo(bar[1], {'a': 2})\nif x:\n    y = x ** 2 + z / 3\n" + prose
    assert not stdlib_corpus.keep_block(code)


def test_embedded_small_round_trip(embedded_small):
    e = embedded_small
    with open(e.corpus_jsonl, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    tok = build_tokenizer("SentencePieceTokenizer", e.tokenizer_model)
    assert (tok.vocab_size, tok.eod, tok.pad) == (e.vocab_size, 2, 3) == (1024, 2, 3)
    assert tok.decode([tok.eod]) == "" and tok.encode("a\nb")[1] == 4  # "\n" is piece 4
    ds = IndexedDataset(e.data_prefix)
    assert ds.index.dtype == np.uint16
    assert len(ds) == len(docs) == e.num_documents > 10
    assert int(ds.sequence_lengths.sum()) == e.num_tokens > 50_000
    chars = 0
    for i, doc in enumerate(docs):
        text = doc["text"]
        chars += len(text)
        assert text == text.strip() and len(text) >= stdlib_corpus.MIN_CHARS
        assert "copyright" not in text.lower()
        seq = ds[i]
        assert seq[-1] == tok.eod and int((seq == tok.eod).sum()) == 1
        assert tok.decode(seq[:-1]) == text  # byte fallback + identity normalization: exact
    assert 300_000 <= chars < 400_000
    assert len({d["text"] for d in docs}) == len(docs)


def test_manifest_fast_path_and_determinism(embedded_small, tmp_path):
    e = embedded_small
    manifest = os.path.join(e.output_dir, MANIFEST_FILE)
    mtime = os.stat(manifest).st_mtime_ns
    start = time.perf_counter()
    again = build_embedded_default(e.output_dir, vocab_size=1024, max_chars=300_000)
    assert time.perf_counter() - start < 1.0
    assert again == e and os.stat(manifest).st_mtime_ns == mtime
    assert load_embedded_default(e.output_dir, vocab_size=2048, max_chars=300_000) is None
    assert load_embedded_default(e.output_dir, vocab_size=1024, max_chars=None) is None

    rebuilt = build_embedded_default(str(tmp_path), vocab_size=1024, max_chars=300_000)
    names = ["corpus.jsonl", "tokenizer.model", "corpus_text_document.bin",
             "corpus_text_document.idx", MANIFEST_FILE]
    for name in names:
        with open(os.path.join(e.output_dir, name), "rb") as a, \
                open(os.path.join(tmp_path, name), "rb") as b:
            assert a.read() == b.read(), name
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # no temporary files left
    assert (rebuilt.num_documents, rebuilt.num_tokens) == (e.num_documents, e.num_tokens)


def test_gpt_dataset_accepts_tokenizer(embedded_small, tmp_path):
    """The Tokenizer duck-types megatron-core's for GPTDataset (vocab_size, eod, pad and the
    unique_identifiers its cache key serializes)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    e = embedded_small
    tok = build_tokenizer("SentencePieceTokenizer", e.tokenizer_model)
    cfg = GPTDatasetConfig(random_seed=1, sequence_length=64, blend=([e.data_prefix], None),
                           split="90,10,0", tokenizer=tok, reset_position_ids=False,
                           reset_attention_mask=False, eod_mask_loss=False,
                           path_to_cache=str(tmp_path))
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [8, 4, 0], lambda: True,
                                                    cfg).build()
    sample = train[0]
    assert sample["tokens"].shape == sample["labels"].shape == (64,)
    assert (sample["tokens"][1:] == sample["labels"][:-1]).all()
    assert int(sample["tokens"].max()) < e.vocab_size and len(valid) >= 4
