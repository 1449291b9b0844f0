"""Integrity check of a megatron-core indexed dataset (``PREFIX.idx`` + ``PREFIX.bin``).

megatron-core reads these files with bare ``assert``s or not at all: a truncated ``.bin`` is
memory-mapped as is and fails (or reads garbage) only when a sample beyond its end is drawn,
possibly hours into a run. This check reads the ``.idx`` header and arrays and compares every
size against the files before training starts.

``.idx`` layout (megatron-core ``IndexedDataset``): magic ``MMIDIDX\\x00\\x00`` (9 bytes), version
uint64 = 1, dtype code uint8, sequence count S uint64, document count D uint64, then
int32[S] sequence lengths (tokens), int64[S] sequence pointers (bytes into ``.bin``), int64[D]
document indices (D = documents + 1, starting at 0, ending at S), optionally int8[S] modes.
"""
from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34
#: megatron-core's DType codes -> numpy dtypes
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}


class IndexedDatasetError(ValueError):
    """A corrupt or inconsistent indexed dataset; the message names the file and the problem."""


@dataclass
class IndexedDatasetInfo:
    """What the check found: token dtype, sequences, documents, tokens."""

    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int
    num_tokens: int


def check_indexed_dataset(prefix: str) -> IndexedDatasetInfo:
    """Validate ``prefix.idx`` and ``prefix.bin`` against each other.

    The result is cached per (prefix, sizes and modification times of both files): start-up asks
    for it twice (the resume fingerprint and the dataset build), and the check reads the whole
    index.

    Raises: FileNotFoundError for a missing file; IndexedDatasetError naming the file for a wrong
    magic or version, an unknown dtype code, a ``.idx`` shorter or longer than its counts imply,
    non-monotonic pointers or document indices, or a ``.bin`` whose size differs from what the
    index describes (truncated or appended to).
    """
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (expected a megatron-core indexed dataset, "
                                    f"e.g. from tools/preprocess_data.py)")
    stats = tuple((os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in (idx, bin_))
    return _check(prefix, stats)


@functools.cache
def _check(prefix: str, stats: tuple) -> IndexedDatasetInfo:
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    idx_size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != MAGIC:
        raise IndexedDatasetError(f"{idx}: not a megatron-core index (expected the magic bytes "
                                  f"{MAGIC!r} and a {HEADER_BYTES}-byte header, found "
                                  f"{head[:9]!r}, {idx_size} bytes)")
    version, code = struct.unpack("<QB", head[9:18])
    seqs, docs = struct.unpack("<QQ", head[18:34])
    if version != 1:
        raise IndexedDatasetError(f"{idx}: index version {version}, expected 1")
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(f"{idx}: unknown token dtype code {code} (expected one of "
                                  f"{sorted(DTYPE_CODES)})")
    arrays = 4 * seqs + 8 * seqs + 8 * docs
    if idx_size not in (HEADER_BYTES + arrays, HEADER_BYTES + arrays + seqs):
        raise IndexedDatasetError(f"{idx}: {idx_size} bytes, but its header announces {seqs} "
                                  f"sequences and {docs} document indices "
                                  f"({HEADER_BYTES + arrays} bytes): truncated or corrupt")
    mm = np.memmap(idx, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, np.int32, seqs, HEADER_BYTES)
    pointers = np.frombuffer(mm, np.int64, seqs, HEADER_BYTES + 4 * seqs)
    doc_idx = np.frombuffer(mm, np.int64, docs, HEADER_BYTES + 12 * seqs)
    itemsize = np.dtype(DTYPE_CODES[code]).itemsize
    if seqs and (lengths.min() < 0 or pointers[0] != 0 or np.any(
            pointers[1:] != pointers[:-1] + lengths[:-1].astype(np.int64) * itemsize)):
        raise IndexedDatasetError(f"{idx}: sequence pointers are not the running sum of the "
                                  f"sequence lengths: corrupt index")
    if docs and (doc_idx[0] != 0 or doc_idx[-1] != seqs or np.any(np.diff(doc_idx) < 0)):
        raise IndexedDatasetError(f"{idx}: document indices must rise from 0 to {seqs}: "
                                  f"corrupt index")
    expected = int(pointers[-1]) + int(lengths[-1]) * itemsize if seqs else 0
    actual = os.path.getsize(bin_)
    if actual != expected:
        raise IndexedDatasetError(
            f"{bin_}: {actual} bytes, but {idx} describes {int(lengths.sum()) if seqs else 0} "
            f"tokens of {np.dtype(DTYPE_CODES[code]).name} ({expected} bytes): the .bin is "
            f"{'truncated' if actual < expected else 'longer than its index'}; re-run "
            f"tools/preprocess_data.py")
    return IndexedDatasetInfo(prefix, DTYPE_CODES[code], int(seqs), max(int(docs) - 1, 0),
                              int(lengths.sum()) if seqs else 0)
