"""The embedded default dataset (docs/design.md §8): built on any machine, with no download.

``build_embedded_default(output_dir)`` writes, deterministically:

- ``corpus.jsonl``: English text from the running Python's standard library
  (``megatron_hybrid.data.stdlib_corpus``), one ``{"text", "source"}`` document per line;
- ``tokenizer.model``: a SentencePiece BPE tokenizer trained on it (byte fallback, so every text
  encodes; identity normalization and kept whitespace, so ``decode(encode(text)) == text``;
  ids: 0 ``<unk>``, 1 ``<s>``, 2 ``</s>`` (eod), 3 ``<pad>``, 4 ``"\\n"``);
- ``corpus_text_document.bin/.idx``: the corpus preprocessed with ``--append-eod``;
- ``manifest.json``, written last: what was built. When it is present and matches the request
  (builder version, Python version, vocabulary, ``max_chars``) and the files exist, the build is
  skipped (well under a second: neither torch nor megatron-core is imported on that path).

Every file is written under a temporary name and renamed when complete, so concurrent builders
(e.g. several ranks) and interrupted builds never leave a partial file under a final name.
"""
from __future__ import annotations

import io
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

BUILDER_VERSION = 1
"""Bump when the corpus, the tokenizer recipe or the preprocessing changes."""

CORPUS_FILE = "corpus.jsonl"
TOKENIZER_FILE = "tokenizer.model"
DATA_PREFIX = "corpus_text_document"
MANIFEST_FILE = "manifest.json"


@dataclass
class EmbeddedDefault:
    """A built embedded default. ``data_prefix``: path without ``.bin/.idx`` (``--data-path``);
    ``tokenizer_model``: the SentencePiece ``.model`` (``--tokenizer-type
    SentencePieceTokenizer``); ``num_tokens`` counts the stored tokens, eod included."""

    output_dir: str
    corpus_jsonl: str
    tokenizer_model: str
    data_prefix: str
    num_documents: int
    num_tokens: int
    vocab_size: int


def default_output_dir() -> str:
    """``data/embedded`` under the repository root (the directory holding ``megatron_hybrid``)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, "data", "embedded")


def _tmp(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def _write_atomic(path: str, data: bytes) -> None:
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _python_id() -> str:
    return f"{platform.python_implementation()} {platform.python_version()}"


def _expected(vocab_size: int, max_chars: int | None) -> dict:
    return {"builder_version": BUILDER_VERSION, "python": _python_id(),
            "requested_vocab_size": vocab_size, "max_chars": max_chars}


def _paths(output_dir: str) -> dict:
    return {
        "corpus_jsonl": os.path.join(output_dir, CORPUS_FILE),
        "tokenizer_model": os.path.join(output_dir, TOKENIZER_FILE),
        "data_prefix": os.path.join(output_dir, DATA_PREFIX),
    }


def load_embedded_default(output_dir: str, vocab_size: int = 8192,
                          max_chars: int | None = None) -> EmbeddedDefault | None:
    """The build in ``output_dir`` when its manifest matches the request and all files exist,
    else None. Reads only ``manifest.json`` and stats files."""
    output_dir = os.path.abspath(output_dir)
    try:
        with open(os.path.join(output_dir, MANIFEST_FILE), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if any(manifest.get(k) != v for k, v in _expected(vocab_size, max_chars).items()):
        return None
    paths = _paths(output_dir)
    files = [paths["corpus_jsonl"], paths["tokenizer_model"],
             paths["data_prefix"] + ".bin", paths["data_prefix"] + ".idx"]
    sizes = manifest.get("file_sizes", {})
    for path in files:
        if not os.path.isfile(path) or os.path.getsize(path) != sizes.get(os.path.basename(path)):
            return None
    try:
        return EmbeddedDefault(output_dir=output_dir, num_documents=int(manifest["num_documents"]),
                               num_tokens=int(manifest["num_tokens"]),
                               vocab_size=int(manifest["vocab_size"]), **paths)
    except (KeyError, TypeError, ValueError):
        return None


def train_sentencepiece_bpe(lines, vocab_size: int) -> bytes:
    """Train the embedded tokenizer; returns the serialized ``.model``.

    ``lines``: training sentences (str, no newlines). BPE, byte fallback, identity normalization,
    whitespace kept, no dummy prefix, ``"\\n"`` a user-defined piece, every sentence used in order
    (no sampling, no shuffling) on one thread: the same lines give the same bytes. The vocabulary
    may come out smaller than ``vocab_size`` on a tiny corpus (``hard_vocab_limit=False``)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True,
        character_coverage=0.9999, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        split_digits=False, user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
        max_sentence_length=1 << 16, minloglevel=2,
    )
    return buf.getvalue()


def build_embedded_default(output_dir: str, vocab_size: int = 8192, max_chars: int | None = None,
                           workers: int = 1, force: bool = False,
                           verbose: bool = False) -> EmbeddedDefault:
    """Build (or reuse) the embedded default in ``output_dir``.

    Args:
        output_dir: destination directory (created).
        vocab_size: SentencePiece vocabulary requested (the trained one may be smaller on tiny
            corpora; ``EmbeddedDefault.vocab_size`` is the real one).
        max_chars: stop collecting documents once the corpus holds this many characters
            (None: the whole standard library). For small, fast builds in tests.
        workers: preprocessing processes.
        force: rebuild even when a matching ``manifest.json`` exists.
        verbose: print the steps, timings and a progress bar.

    Returns: the ``EmbeddedDefault`` describing the files.
    """
    output_dir = os.path.abspath(output_dir)
    if not force:
        found = load_embedded_default(output_dir, vocab_size, max_chars)
        if found is not None:
            if verbose:
                print(f"embedded default up to date in {output_dir} (manifest matches)")
            return found
    from megatron_hybrid.data import stdlib_corpus
    from megatron_hybrid.data.preprocess import preprocess

    os.makedirs(output_dir, exist_ok=True)
    paths = _paths(output_dir)
    manifest_path = os.path.join(output_dir, MANIFEST_FILE)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the files below are about to change
    timings = {}

    t0 = time.perf_counter()
    docs = list(stdlib_corpus.iter_documents(max_chars=max_chars))
    if not docs:
        raise RuntimeError(f"no documents found in the standard library at "
                           f"{stdlib_corpus.stdlib_dir()}")
    _write_atomic(paths["corpus_jsonl"], "".join(
        json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8"))
    num_chars = sum(len(d["text"]) for d in docs)
    timings["corpus_s"] = time.perf_counter() - t0
    if verbose:
        print(f"corpus: {len(docs):,} documents, {num_chars:,} characters from "
              f"{stdlib_corpus.stdlib_dir()} ({timings['corpus_s']:.1f} s)")

    t0 = time.perf_counter()
    lines = [ln for d in docs for ln in d["text"].split("\n") if ln.strip()]
    _write_atomic(paths["tokenizer_model"], train_sentencepiece_bpe(lines, vocab_size))
    timings["tokenizer_s"] = time.perf_counter() - t0
    del lines, docs

    t0 = time.perf_counter()
    result = preprocess(paths["corpus_jsonl"], os.path.join(output_dir, "corpus"),
                        "SentencePieceTokenizer", paths["tokenizer_model"], json_keys=["text"],
                        append_eod=True, workers=workers, progress=verbose, quiet=not verbose)
    timings["preprocess_s"] = time.perf_counter() - t0
    from megatron_hybrid.data.tokenizer import build_tokenizer

    real_vocab = build_tokenizer("SentencePieceTokenizer", paths["tokenizer_model"]).vocab_size
    built = EmbeddedDefault(output_dir=output_dir, num_documents=result.documents["text"],
                            num_tokens=result.tokens["text"], vocab_size=real_vocab, **paths)
    files = [paths["corpus_jsonl"], paths["tokenizer_model"],
             paths["data_prefix"] + ".bin", paths["data_prefix"] + ".idx"]
    manifest = dict(_expected(vocab_size, max_chars),
                    stdlib=stdlib_corpus.stdlib_dir(), python_full=sys.version,
                    num_documents=built.num_documents, num_tokens=built.num_tokens,
                    num_chars=num_chars, vocab_size=real_vocab, dtype=result.dtype,
                    file_sizes={os.path.basename(p): os.path.getsize(p) for p in files})
    _write_atomic(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    if verbose:
        print("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        print(json.dumps(asdict(built), indent=2))
    return built
