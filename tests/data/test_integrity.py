"""Indexed-dataset integrity check: every corruption is named with its file before training."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from megatron_hybrid.data.integrity import IndexedDatasetError, check_indexed_dataset


@pytest.fixture
def dataset(embedded_small, tmp_path):
    prefix = str(tmp_path / "d")
    for ext in (".bin", ".idx"):
        shutil.copy(embedded_small.data_prefix + ext, prefix + ext)
    return prefix


def test_intact_dataset_counts_match_megatron_core(dataset):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    info = check_indexed_dataset(dataset)
    ref = IndexedDataset(dataset, mmap=True)
    assert info.num_sequences == len(ref.sequence_lengths)
    assert info.num_tokens == int(ref.sequence_lengths.sum())
    assert info.num_documents == len(ref.document_indices) - 1
    assert np.dtype(info.dtype) == np.dtype(ref.index.dtype)


def _cut(path, nbytes):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-nbytes])


@pytest.mark.parametrize("case,fragment", [
    ("truncated_bin", ".bin: {n} bytes, but"),
    ("appended_bin", "longer than its index"),
    ("wrong_magic", "not a megatron-core index"),
    ("truncated_idx", "truncated or corrupt"),
    ("short_idx", "not a megatron-core index"),
    ("bad_version", "index version 7, expected 1"),
])
def test_corruptions_are_named(dataset, case, fragment):
    idx, bin_ = dataset + ".idx", dataset + ".bin"
    if case == "truncated_bin":
        _cut(bin_, 10)
    elif case == "appended_bin":
        open(bin_, "ab").write(b"\0\0")
    elif case == "wrong_magic":
        data = bytearray(open(idx, "rb").read())
        data[:9] = b"NOTANIDX!"
        open(idx, "wb").write(bytes(data))
    elif case == "truncated_idx":
        _cut(idx, 8)
    elif case == "short_idx":
        open(idx, "wb").write(open(idx, "rb").read()[:20])
    elif case == "bad_version":
        data = bytearray(open(idx, "rb").read())
        data[9:17] = (7).to_bytes(8, "little")
        open(idx, "wb").write(bytes(data))
    import os

    with pytest.raises(IndexedDatasetError) as err:
        check_indexed_dataset(dataset)
    msg = str(err.value)
    assert fragment.format(n=os.path.getsize(bin_)) in msg, msg
    assert (bin_ if "bin" in case else idx) in msg


def test_missing_file_is_named(dataset):
    import os

    os.remove(dataset + ".bin")
    with pytest.raises(FileNotFoundError, match=r"d\.bin not found"):
        check_indexed_dataset(dataset)
