"""Build the embedded default dataset from the running Python's standard library (no download).

    python tools/build_embedded_corpus.py                 # -> data/embedded/ under the repo root

writes ``corpus.jsonl`` (English docstrings, comments and the language-reference topics),
``tokenizer.model`` (SentencePiece BPE trained on it), ``corpus_text_document.bin/.idx``
(preprocessed with --append-eod) and ``manifest.json``. A matching existing build is reused
unless ``--force``. Train on it with ``--data-path DIR/corpus_text_document --tokenizer-type
SentencePieceTokenizer --tokenizer-model DIR/tokenizer.model``.
"""
from __future__ import annotations

import argparse
import time


def parse_args(argv=None):
    """Command-line flags."""
    from megatron_hybrid.data.embedded import default_output_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=default_output_dir(),
                   help="destination (default: data/embedded under the repository root)")
    p.add_argument("--vocab-size", type=int, default=8192, help="SentencePiece vocabulary")
    p.add_argument("--max-chars", type=int, default=None,
                   help="stop collecting text after this many characters (default: all)")
    p.add_argument("--workers", type=int, default=1, help="preprocessing processes")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Build (or reuse) and print what was built; returns the exit status."""
    args = parse_args(argv)
    from megatron_hybrid.data.embedded import build_embedded_default

    start = time.perf_counter()
    built = build_embedded_default(args.output_dir, vocab_size=args.vocab_size,
                                   max_chars=args.max_chars, workers=args.workers,
                                   force=args.force, verbose=True)
    print(f"embedded default: {built.num_documents:,} documents, {built.num_tokens:,} tokens, "
          f"vocab {built.vocab_size:,} in {time.perf_counter() - start:.1f} s\n"
          f"  --data-path {built.data_prefix}\n"
          f"  --tokenizer-type SentencePieceTokenizer --tokenizer-model {built.tokenizer_model}")
    return 0
