"""What a resumed run must share with its checkpoint: tokenizer and data (besides the model shape,
``checkpoint.check_model_matches``).

Each checkpoint records a tokenizer fingerprint (type, vocabulary, special ids and the SHA-256 of
the tokenizer file, so a moved file is fine and an edited one is not) and a data fingerprint (per
``--data-path`` dataset: blend weight, documents, tokens, dtype; plus ``--split``,
``--seq-length`` and ``--seed``, which fix the sample order). A resume compares both with the
current flags and lists every difference with both values. A different tokenizer is always an
error; different data is an error unless ``--override-data-check`` (e.g. a deliberate switch of
the corpus mid-run).
"""
from __future__ import annotations

import hashlib
import os

from megatron_hybrid.checkpoint.storage import CheckpointError

TOKENIZER_FIELDS = ("tokenizer_type", "vocab_size", "eod", "pad", "sha256")


def file_sha256(path: str) -> str:
    """SHA-256 of a file, or of every file of a directory in sorted order."""
    h = hashlib.sha256()
    files = ([os.path.join(r, f) for r, _, fs in sorted(os.walk(path)) for f in sorted(fs)]
             if os.path.isdir(path) else [path])
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    """The tokenizer as recorded: ``describe()`` plus the SHA-256 of its model file."""
    out = dict(tokenizer.describe())
    path = out.get("tokenizer_model")
    if path and os.path.exists(path):
        out["sha256"] = file_sha256(path)
    return out


def _diffs(saved: dict, current: dict, fields) -> list[str]:
    return [f"{name}: checkpoint {saved[name]!r}, this run {current.get(name)!r}"
            for name in fields if name in saved and saved[name] != current.get(name)]


def check_tokenizer_matches(run_config: dict, current: dict, path: str) -> None:
    """Raise CheckpointError listing every tokenizer field that differs (not the file's path)."""
    diffs = _diffs(run_config.get("tokenizer") or {}, current, TOKENIZER_FIELDS)
    if diffs:
        raise CheckpointError(f"{path} was trained with another tokenizer than --tokenizer-model "
                              f"{current.get('tokenizer_model')}:\n  " + "\n  ".join(diffs))


def check_data_matches(run_config: dict, current: dict, path: str, override: bool) -> list[str]:
    """Compare the data fingerprints; returns the differences (printed by the caller).

    Raises: CheckpointError listing them unless ``override`` (``--override-data-check``).
    """
    saved = run_config.get("data")
    if not saved:  # checkpoints written before fingerprints were recorded
        return []
    diffs = _diffs(saved, current, ("split", "seq_length", "seed", "datasets"))
    if diffs and not override:
        raise CheckpointError(
            f"{path} was trained on other data than these flags give (--data-path, --split, "
            f"--seq-length, --seed):\n  " + "\n  ".join(diffs)
            + "\n(--override-data-check resumes anyway, continuing at the checkpoint's consumed "
              "samples)")
    return diffs
