"""Text -> megatron-core indexed dataset (``P_{key}_document.bin/.idx``), as Megatron-LM's
``tools/preprocess_data.py`` with the Olmo preprocessing rule (docs/model.md §9).

Inputs: a JSONL file (one document per line, text under each ``--json-keys`` key), a ``.txt`` /
``.md`` file (one document), or a directory (recursively, sorted: ``.jsonl`` line by line,
``.txt`` / ``.md`` one document per file). Rule: strip each document, skip empty ones (counted),
encode without special tokens, with ``--append-eod`` append the eod id unless already last. Each
document is stored as one sequence. The token dtype is megatron-core's
``DType.optimal_dtype(vocab_size)``: uint16 below 65,500 ids, int32 from 65,500 (dolma2).

Bad lines (invalid JSON, not an object, missing key, non-string value, non-UTF-8 bytes, lone
surrogates) stop the run with ``BadInputError("FILE:LINE: reason")`` (1-based line), or are counted
and skipped with ``skip_bad_lines``. Outputs are written under temporary names beside the final
ones and renamed only when complete, so a failure leaves neither ``.bin/.idx`` nor temp files.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from megatron_hybrid.data.tokenizer import build_tokenizer

TEXT_SUFFIXES = (".txt", ".md")
MAX_BAD_LOCATIONS = 5
_BATCH_DOCS = 64
_BATCH_BYTES = 1 << 20


class BadInputError(ValueError):
    """A bad input line; the message is ``FILE:LINE: reason``."""


@dataclass
class PreprocessResult:
    """What ``preprocess`` wrote. Per json key: ``prefixes`` (dataset prefix, no ``.bin/.idx``),
    ``documents`` (stored), ``tokens`` (stored, eod included), ``skipped`` (empty documents).
    ``bad_lines``: skipped bad lines; ``bad_locations``: the first few ``FILE:LINE: reason``;
    ``dtype``: numpy dtype name of the tokens; ``seconds``: wall time."""

    prefixes: dict = field(default_factory=dict)
    documents: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    bad_lines: int = 0
    bad_locations: list = field(default_factory=list)
    dtype: str = ""
    seconds: float = 0.0

    def summary(self) -> str:
        """Human-readable summary: docs, tokens, skipped, bad lines, seconds, rates, outputs."""
        docs, toks = sum(self.documents.values()), sum(self.tokens.values())
        secs = max(self.seconds, 1e-9)
        lines = [f"preprocessed {docs:,} documents, {toks:,} tokens "
                 f"({sum(self.skipped.values()):,} empty skipped, {self.bad_lines:,} bad lines) "
                 f"in {self.seconds:.1f} s ({docs / secs:,.0f} docs/s, {toks / secs:,.0f} tokens/s)"]
        for key, prefix in self.prefixes.items():
            lines.append(f"  {key}: {prefix}.bin/.idx ({self.dtype}, {self.documents[key]:,} "
                         f"documents, {self.tokens[key]:,} tokens, {self.skipped[key]:,} empty)")
        if self.bad_lines:
            lines.append(f"  skipped {self.bad_lines:,} bad lines; first: "
                         + "; ".join(self.bad_locations))
        return "\n".join(lines)


def list_input_files(input_path: str) -> list[tuple[str, str]]:
    """``[(path, kind)]`` with kind ``"jsonl"`` or ``"text"``. A directory is walked recursively
    (hidden entries skipped) and its ``.jsonl`` / ``.txt`` / ``.md`` files sorted by relative path;
    a file is plain text when it ends in ``.txt`` / ``.md``, JSONL otherwise.
    Raises FileNotFoundError (missing path) or ValueError (a directory with no such files)."""
    if os.path.isfile(input_path):
        return [(input_path, "text" if input_path.endswith(TEXT_SUFFIXES) else "jsonl")]
    if not os.path.isdir(input_path):
        raise FileNotFoundError(f"--input {input_path}: no such file or directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(input_path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            if name.endswith(".jsonl") or name.endswith(TEXT_SUFFIXES):
                rel = os.path.relpath(os.path.join(dirpath, name), input_path)
                found.append(tuple(rel.split(os.sep)))
    if not found:
        raise ValueError(f"--input {input_path}: the directory holds no .jsonl, .txt or .md files")
    out = []
    for parts in sorted(found):
        path = os.path.join(input_path, *parts)
        out.append((path, "jsonl" if parts[-1].endswith(".jsonl") else "text"))
    return out


def iter_records(files: Sequence[tuple[str, str]]) -> Iterator[tuple[str, int, str, bytes]]:
    """``(file, line, kind, raw bytes)`` per JSONL line (newline removed) or per text file
    (``line`` = 1)."""
    for path, kind in files:
        with open(path, "rb") as f:
            if kind == "text":
                yield path, 1, kind, f.read()
                continue
            for line_no, raw in enumerate(f, 1):
                yield path, line_no, kind, raw.rstrip(b"\r\n")


class _Encoder:
    """Turns one record into per-key token arrays (worker side; no torch, no megatron-core)."""

    def __init__(self, tokenizer_type, tokenizer_model, eod_token, json_keys, append_eod):
        self.tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, eod_token)
        self.json_keys = list(json_keys)
        self.append_eod = append_eod

    def texts(self, line: int, kind: str, raw: bytes):
        """Per-key texts, or ``(bad_line, reason)`` as a tuple of (int, str)."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad_line = line + raw.count(b"\n", 0, e.start)
            column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
            return bad_line, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column})"
        if line == 1:
            text = text.lstrip("\ufeff")
        if kind == "text":
            return [text] * len(self.json_keys)
        if not text.strip():
            return []  # a blank line is no document
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return line, f"invalid JSON: {e.msg} (column {e.colno})"
        if not isinstance(obj, dict):
            return line, f"expected a JSON object, got {type(obj).__name__}"
        out = []
        for key in self.json_keys:
            if key not in obj:
                return line, f"missing key {key!r}"
            value = obj[key]
            if not isinstance(value, str):
                kind_name = "null" if value is None else type(value).__name__
                return line, f"key {key!r} holds {kind_name}, not a string"
            out.append(value)
        return out

    def process(self, record):
        """``(file, line, ("bad", reason) | [int32 array or None per key])``."""
        path, line, kind, raw = record
        texts = self.texts(line, kind, raw)
        if isinstance(texts, tuple):
            return path, texts[0], ("bad", texts[1])
        arrays = []
        for text in texts:
            text = text.strip()
            try:
                ids = self.tokenizer.encode(text) if text else []
            except Exception:
                try:  # tokenizers / sentencepiece reject lone surrogates ("\ud800" in JSON)
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    return path, line, ("bad", f"invalid Unicode ({e.reason})")
                raise
            if ids and self.append_eod and ids[-1] != self.tokenizer.eod:
                ids.append(self.tokenizer.eod)
            arrays.append(np.asarray(ids, dtype=np.int32) if ids else None)
        return path, line, arrays

    def process_batch(self, batch):
        return [self.process(r) for r in batch]


_WORKER: _Encoder | None = None


_STOP = threading.Event()


def request_stop() -> None:
    """Ask a running ``preprocess`` to stop at the next batch: it raises KeyboardInterrupt there
    and removes its temporary outputs (signal handlers call this; raising inside a handler can
    land in a finalizer, where Python drops the exception)."""
    _STOP.set()


def _init_worker(*args):
    global _WORKER
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # workers die quietly when the pool ends
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER = _Encoder(*args)


def _work(batch):
    return _WORKER.process_batch(batch)


def _batches(records) -> Iterator[list]:
    batch, size = [], 0
    for record in records:
        batch.append(record)
        size += len(record[3])
        if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _results(files, workers: int, encoder_args) -> Iterator[list]:
    """Processed batches in input order; with ``workers > 1`` a process pool (fork where
    available) encodes at most ``2 * workers`` batches ahead."""
    batches = _batches(iter_records(files))
    if workers <= 1:
        encoder = _Encoder(*encoder_args)
        for batch in batches:
            yield encoder.process_batch(batch)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=encoder_args)
    try:
        pending = deque()
        for batch in batches:
            pending.append(pool.apply_async(_work, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


def _remove(paths):
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def _consume(results, builders: dict, json_keys: list[str], result: PreprocessResult,
             skip_bad_lines: bool, log_interval: int, progress: bool, start: float) -> None:
    """Append every encoded document of ``results`` (batches of (path, line, arrays)) to its
    key's builder, counting documents, tokens, empty documents and bad lines into ``result``.

    Raises BadInputError for a bad line (``FILE:LINE: reason``) unless ``skip_bad_lines``;
    KeyboardInterrupt when a stop was requested (SIGINT / SIGTERM).
    """
    import torch
    from tqdm import tqdm

    bar = tqdm(unit=" docs", disable=not progress, file=sys.stderr, mininterval=0.5)
    seen = since_postfix = 0
    try:
        for batch in results:
            if _STOP.is_set():
                raise KeyboardInterrupt("stop requested")
            for path, line, arrays in batch:
                if isinstance(arrays, tuple):
                    location = f"{path}:{line}: {arrays[1]}"
                    if not skip_bad_lines:
                        raise BadInputError(location)
                    result.bad_lines += 1
                    if len(result.bad_locations) < MAX_BAD_LOCATIONS:
                        result.bad_locations.append(location)
                    continue
                for key, ids in zip(json_keys, arrays, strict=True):
                    if ids is None:
                        result.skipped[key] += 1
                        continue
                    builders[key].add_item(torch.from_numpy(ids))
                    builders[key].end_document()
                    result.documents[key] += 1
                    result.tokens[key] += len(ids)
            seen += len(batch)
            bar.update(len(batch))
            if seen - since_postfix >= log_interval:
                since_postfix = seen
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{sum(result.tokens.values()) / elapsed:,.0f} tokens/s")
    finally:
        results.close()
        bar.close()


def preprocess(input: str, output_prefix: str, tokenizer_type: str, tokenizer_model: str,
               json_keys: Sequence[str] = ("text",), append_eod: bool = False,
               eod_token: str | int | None = None, workers: int = 1,
               skip_bad_lines: bool = False, log_interval: int = 1000,
               progress: bool = True, quiet: bool = False) -> PreprocessResult:
    """Tokenize ``input`` into ``{output_prefix}_{key}_document.bin/.idx`` for each json key.

    Args: as the command-line flags (``tools/preprocess_data.py --help``); ``progress`` shows a
    tqdm bar (documents/s, tokens/s refreshed every ``log_interval`` documents); ``quiet`` skips
    the printed summary. Output is independent of ``workers``.

    Raises:
        BadInputError: a bad line (``FILE:LINE: reason``) without ``skip_bad_lines``.
        FileNotFoundError / ValueError: missing input, bad tokenizer flags, several json keys with
            plain-text input.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    start = time.perf_counter()
    json_keys = list(json_keys)
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys {json_keys}: give one or more distinct keys")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, eod_token)
    files = list_input_files(input)
    if len(json_keys) > 1 and any(kind == "text" for _, kind in files):
        text_file = next(p for p, kind in files if kind == "text")
        raise ValueError(f"--json-keys {','.join(json_keys)}: several keys need JSONL input, but "
                         f"{text_file} is plain text")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    result = PreprocessResult(dtype=np.dtype(dtype).name)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    _STOP.clear()
    finals, temps, builders = [], [], {}
    try:
        for key in json_keys:
            prefix = f"{output_prefix}_{key}_document"
            result.prefixes[key] = prefix
            result.documents[key] = result.tokens[key] = result.skipped[key] = 0
            finals += [prefix + ".bin", prefix + ".idx"]
            temps += [prefix + ".bin" + tag, prefix + ".idx" + tag]
            builders[key] = IndexedDatasetBuilder(prefix + ".bin" + tag, dtype=dtype)
        encoder_args = (tokenizer_type, tokenizer.tokenizer_model, eod_token, json_keys, append_eod)
        _consume(_results(files, workers, encoder_args), builders, json_keys, result,
                 skip_bad_lines, log_interval, progress, start)
        empty = [key for key in json_keys if result.documents[key] == 0]
        if empty:  # an empty dataset would only fail later, inside training
            raise BadInputError(
                f"{input}: no documents for --json-keys {' '.join(empty)} ({result.bad_lines} "
                f"bad lines skipped, {sum(result.skipped.values())} empty documents); nothing "
                f"written")
        for key in json_keys:
            prefix = result.prefixes[key]
            builders[key].finalize(prefix + ".idx" + tag)
        for key in json_keys:
            prefix = result.prefixes[key]
            os.replace(prefix + ".bin" + tag, prefix + ".bin")
            os.replace(prefix + ".idx" + tag, prefix + ".idx")
    except BaseException:
        for builder in builders.values():
            builder.data_file.close()
        _remove(temps)
        raise
    result.seconds = time.perf_counter() - start
    if not quiet:
        print(result.summary(), flush=True)
    return result


def add_arguments(parser) -> None:
    """Megatron-LM's ``preprocess_data.py`` flags (the subset this project supports)."""
    parser.add_argument("--input", required=True,
                        help="JSONL file, .txt/.md file, or a directory of them (recursive)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes PREFIX_{key}_document.bin/.idx")
    parser.add_argument("--tokenizer-type", required=True,
                        choices=["HuggingFaceTokenizer", "SentencePieceTokenizer"])
    parser.add_argument("--tokenizer-model", required=True,
                        help="tokenizer.json or a directory with one (HF), or a .model file")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="JSON keys to read; one dataset per key (default: text)")
    parser.add_argument("--append-eod", action="store_true",
                        help="append the end-of-document token unless already last")
    parser.add_argument("--eod-token", default=None,
                        help="end-of-document token (string) or id; default: the tokenizer's")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="count and skip bad input lines instead of stopping")
    parser.add_argument("--log-interval", type=int, default=1000,
                        help="refresh the tokens/s figure every this many documents")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
