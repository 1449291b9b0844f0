"""Training data: megatron-core ``GPTDataset`` splits and per-rank micro-batch iterators.

Letters: B micro-batch size, S sequence length (``--seq-length``).

Datasets come from megatron-core's ``BlendedMegatronDatasetBuilder`` (``--data-path`` with
optional blend weights, ``--split``), built on the pipeline stages that consume data (the first
stage reads tokens and positions, the last labels and the loss mask). Sample order follows
Megatron's pretraining sampler: global sample ``consumed + k`` of each global batch goes to
data-parallel rank ``(k // B) % DP``, so resuming at ``consumed_train_samples`` continues the same
sequence of batches. Validation restarts from the first validation sample at every evaluation,
so evaluation losses are comparable across iterations.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

from megatron_hybrid.data.integrity import check_indexed_dataset


@dataclass
class MockTokenizer:
    """Vocabulary facts for ``--mock-data`` without a tokenizer (``--vocab-size``)."""

    vocab_size: int
    eod: int
    pad: int = -1

    def describe(self) -> dict:
        """Tokenizer record for ``run_config.yaml``."""
        return {"tokenizer_type": None, "vocab_size": self.vocab_size, "eod": self.eod}

    @property
    def unique_identifiers(self) -> dict:
        """What megatron-core's dataset cache hashes (it JSON-dumps the tokenizer with this)."""
        return self.describe()


def load_tokenizer(args):
    """The tokenizer of ``--tokenizer-type/--tokenizer-model`` (or a MockTokenizer)."""
    if args.tokenizer_model is None:
        return MockTokenizer(vocab_size=args.vocab_size, eod=args.vocab_size - 1)
    from megatron_hybrid.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.eod_token)
    if not hasattr(tokenizer, "unique_identifiers"):
        # megatron-core's dataset cache key JSON-dumps the tokenizer through this attribute.
        tokenizer.unique_identifiers = tokenizer.describe()
    return tokenizer


def split_sizes(args) -> list[int]:
    """Samples needed per split: train, validation (one evaluation), test (one evaluation)."""
    gbs = args.global_batch_size
    return [args.train_iters * gbs, args.eval_iters * gbs, args.eval_iters * gbs]


def _builds_data() -> bool:
    return (parallel_state.is_pipeline_first_stage(ignore_virtual=True)
            or parallel_state.is_pipeline_last_stage(ignore_virtual=True))


def build_datasets(args, tokenizer):
    """(train, valid, test) GPTDatasets (None on stages without data, or for an empty split).

    Raises: FileNotFoundError naming ``--data-path`` when a prefix has no ``.bin``/``.idx``;
    IndexedDatasetError naming the file for a corrupt or truncated dataset.
    """
    blend = None
    if not args.mock_data:
        blend = parse_data_path(args.data_path)
        for prefix in blend[0]:  # before megatron-core memory-maps (and trusts) the files
            try:
                check_indexed_dataset(prefix)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"--data-path: {exc}") from None
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
        split=args.split, path_to_cache=args.data_cache_path, tokenizer=tokenizer,
        reset_position_ids=bool(getattr(args, "reset_position_ids", False)),
        reset_attention_mask=bool(getattr(args, "reset_attention_mask", False)),
        eod_mask_loss=False,
        create_attention_mask=False, mmap_bin_files=True)
    # The test split is never read by the trainer; megatron-core loops forever building a
    # requested split that received no documents, so it is not built at all.
    config.split_matrix = [config.split_matrix[0], config.split_matrix[1], None]
    if blend is not None:
        _check_split_documents(blend[0], config.split_matrix, args)
    cls = MockGPTDataset if args.mock_data else GPTDataset
    # packed documents: every pipeline stage needs the tokens to find the document offsets
    builds = (lambda: True) if getattr(args, "reset_attention_mask", False) else _builds_data
    return BlendedMegatronDatasetBuilder(cls, split_sizes(args), builds, config).build()


def parse_data_path(items: list[str]):
    """``--data-path`` items -> (prefixes, weights or None), megatron-core's blend tuple.

    Accepts ``PREFIX [PREFIX ...]`` or ``W1 PREFIX1 W2 PREFIX2 ...`` (weights > 0).
    Raises: ValueError naming ``--data-path`` for an odd weighted list, a weight that is not a
    positive number, or a prefix given with its ``.bin``/``.idx`` suffix.
    """
    def number(x):
        try:
            return float(x)
        except ValueError:
            return None

    for item in items:
        if item.endswith((".bin", ".idx")):
            raise ValueError(f"--data-path {item}: give the prefix without .bin/.idx "
                             f"({item[:-4]})")
    if len(items) % 2 == 0 and number(items[0]) is not None:  # W1 P1 W2 P2 ...
        for raw in items[::2]:
            if number(raw) is None or number(raw) <= 0:
                raise ValueError(f"--data-path: blend weight {raw!r} is not a positive number")
        return get_blend_from_list(items)
    numeric = [x for x in items if number(x) is not None and not os.path.exists(x + ".bin")]
    if numeric:
        raise ValueError(f"--data-path {' '.join(items)}: {numeric[0]!r} looks like a blend "
                         f"weight, but a weighted blend needs WEIGHT PREFIX pairs")
    return get_blend_from_list(items)


def check_token_ids(batch: dict, vocab_size: int, args) -> None:
    """Raise ValueError when a batch holds token ids outside [0, vocab_size): data tokenized
    with another tokenizer (an embedding lookup would fail or, under TP, silently read zeros)."""
    for key in ("tokens", "labels"):
        if key in batch and batch[key].numel():
            hi, lo = int(batch[key].max()), int(batch[key].min())
            if hi >= vocab_size or lo < 0:
                raise ValueError(
                    f"--data-path {' '.join(args.data_path or [])}: token id {hi if hi >= vocab_size else lo} "
                    f"is outside the vocabulary of --tokenizer-model {args.tokenizer_model} "
                    f"({vocab_size} ids); preprocess the data with this tokenizer")


def _check_split_documents(prefixes, split_matrix, args) -> None:
    """Raise ValueError naming ``--split`` and the prefix when train (or, with evaluation,
    validation) would receive no documents of a dataset (megatron-core would hang)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        n = len(IndexedDataset(prefix, mmap=True).sequence_lengths)
        for name, bounds in (("train", split_matrix[0]), ("validation", split_matrix[1])):
            if bounds is None and name == "train":
                raise ValueError(f"--split {args.split}: the train split has weight 0")
            if bounds is None or (name == "validation" and args.eval_iters == 0):
                continue
            docs = int(round(bounds[1] * n)) - int(round(bounds[0] * n))
            if docs < 1:
                raise ValueError(
                    f"--split {args.split}: the {name} split gets 0 of the {n} documents of "
                    f"{prefix}; give it a larger weight (e.g. --split 98,2,0) or set "
                    f"--eval-iters 0")


class PretrainingSampler:
    """Megatron's pretraining batch sampler: this DP rank's index lists, one per micro-batch.

    Args:
        total_samples: dataset length; iteration stops when a full DP micro-batch would pass it.
        consumed_samples: global samples already used (resume point).
        micro_batch_size, data_parallel_rank, data_parallel_size: the layout.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        self.total = total_samples
        self.consumed = consumed_samples
        self.mbs = micro_batch_size
        self.rank = data_parallel_rank
        self.step = micro_batch_size * data_parallel_size

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed
        while start + self.step <= self.total:
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))
            start += self.step

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // self.step)


def build_loader(dataset, consumed_samples: int, args) -> Iterator[dict] | None:
    """Iterator of micro-batch dicts (``tokens``, ``labels``, ``loss_mask``, ``position_ids``:
    [B, S]) for this rank, starting at ``consumed_samples``; None when ``dataset`` is None."""
    if dataset is None:
        return None
    sampler = PretrainingSampler(len(dataset), consumed_samples, args.micro_batch_size,
                                 parallel_state.get_data_parallel_rank(),
                                 parallel_state.get_data_parallel_world_size())
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False)
    return iter(loader)


def move_batch(batch: dict | None, device: torch.device) -> dict | None:
    """The batch's tensors on ``device`` (tokens/labels/position ids int64, loss mask float)."""
    if batch is None:
        return None
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    return out


def data_fingerprint(args) -> dict:
    """What fixes the training data and its order: datasets, split, sequence length, seed.

    Recorded in each checkpoint and compared on resume (``checkpoint.resume_checks``).
    """
    out: dict = {"split": args.split, "seq_length": args.seq_length, "seed": args.seed}
    if args.mock_data:
        out["datasets"] = "mock"
        return out
    prefixes, weights = parse_data_path(args.data_path)
    datasets = []
    for i, prefix in enumerate(prefixes):
        info = check_indexed_dataset(prefix)
        datasets.append({"weight": None if weights is None else float(weights[i]),
                         "documents": info.num_documents, "tokens": info.num_tokens,
                         "dtype": info.dtype.__name__})
    out["datasets"] = datasets
    return out
