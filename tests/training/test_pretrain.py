"""End-to-end training on the embedded corpus: data order, resume exactness, resharded resume.

Runs ``megatron_hybrid.training.train.pretrain`` inside forked gloo workers (tests/dist.py) on the
session's small embedded default (``embedded_small``): a 4-layer Olmo Hybrid (3 GDN + 1 attention),
sequence 32.
"""
from __future__ import annotations

import os

import pytest
import torch
import yaml

import megatron.core.parallel_state as ps
from megatron_hybrid.checkpointing import read_run_config, read_tracker
from megatron_hybrid.training.arguments import parse_args
from megatron_hybrid.training.data import PretrainingSampler, build_datasets, build_loader
from megatron_hybrid.training.train import pretrain
from tests.dist import run_distributed

pytestmark = pytest.mark.distributed


def _flags(data, ckpt=None, tp=1, pp=1, iters=10, extra=()):
    flags = ["--model-preset", "tiny", "--num-layers", "4", "--hidden-size", "64",
             "--ffn-hidden-size", "128", "--num-attention-heads", "2", "--kv-channels", "32",
             "--linear-num-key-heads", "2", "--linear-num-value-heads", "2",
             "--linear-key-head-dim", "16", "--linear-value-head-dim", "32",
             "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
             "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
             "--train-iters", str(iters), "--lr", "3e-3", "--min-lr", "3e-4",
             "--lr-warmup-iters", "2", "--log-interval", "1", "--num-workers", "0",
             "--data-path", data.data_prefix, "--tokenizer-type", "SentencePieceTokenizer",
             "--tokenizer-model", data.tokenizer_model, "--split", "90,10,0",
             "--eval-interval", "1000", "--eval-iters", "1", "--use-distributed-optimizer",
             "--seed", "1234"]
    if ckpt is not None:
        flags += ["--save", ckpt, "--load", ckpt]
    return flags + list(extra)


def _pretrain_worker(rank, argv):
    out = pretrain(argv)
    return out["last_losses"] if ps.is_pipeline_last_stage() and \
        ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0 else None


def _losses(results):
    return next(r for r in results if r is not None)


@pytest.fixture(scope="module")
def reference_losses(embedded_small):
    """10 uninterrupted iterations at TP=2 x PP=2 (4 ranks)."""
    return _losses(run_distributed(_pretrain_worker, 4, _flags(embedded_small, tp=2, pp=2),
                                   tp=2, pp=2, timeout=300))


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_losses_exactly(embedded_small, reference_losses,
                                                        tmp_path):
    ckpt = str(tmp_path / "ckpt")
    first = _flags(embedded_small, ckpt, tp=2, pp=2, extra=["--exit-interval", "5",
                                                             "--save-interval", "5"])
    head = _losses(run_distributed(_pretrain_worker, 4, first, tp=2, pp=2, timeout=300))
    assert read_tracker(ckpt) == 5
    run_config = read_run_config(ckpt)
    assert run_config["parallel"]["tensor_model_parallel_size"] == 2
    assert run_config["tokenizer"]["tokenizer_type"] == "SentencePieceTokenizer"
    tail = _losses(run_distributed(_pretrain_worker, 4, _flags(embedded_small, ckpt, tp=2, pp=2),
                                   tp=2, pp=2, timeout=300))
    assert head == reference_losses[:5]
    assert tail == reference_losses[5:], "the resumed run must repeat the next 5 losses exactly"
    assert reference_losses[-1] < reference_losses[0] - 0.3  # it learns

    # The same checkpoint resumed at another layout (TP=1 x PP=2, 2 ranks) reshards the model
    # and the fully reshardable optimizer state.
    os.remove(os.path.join(ckpt, "latest_checkpointed_iteration.txt"))
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("5\n")
    other = _losses(run_distributed(_pretrain_worker, 2,
                                    _flags(embedded_small, str(tmp_path / "ckpt"), tp=1, pp=2,
                                           extra=["--no-load-rng"]),
                                    pp=2, timeout=300))
    assert len(other) == 5
    for got, want in zip(other, reference_losses[5:]):
        assert abs(got - want) < 1e-3, (other, reference_losses[5:])


def _loader_worker(rank, argv, consumed, n):
    args = parse_args(argv)
    from megatron_hybrid.training.data import load_tokenizer

    train, _, _ = build_datasets(args, load_tokenizer(args))
    loader = build_loader(train, consumed, args)
    return [next(loader)["tokens"] for _ in range(n)]


def test_data_order_is_deterministic_and_resumable(embedded_small):
    argv = _flags(embedded_small, pp=1)
    # two data-parallel ranks (world 2, TP=PP=1): micro-batches of 2, global batch 8
    a = run_distributed(_loader_worker, 2, argv, 0, 4)
    b = run_distributed(_loader_worker, 2, argv, 0, 4)
    for x, y in zip(a, b):
        assert all(torch.equal(p, q) for p, q in zip(x, y))
    # resuming after one global batch (8 samples = 2 micro-batches per rank) continues the stream
    c = run_distributed(_loader_worker, 2, argv, 8, 2)
    for rank in range(2):
        assert all(torch.equal(p, q) for p, q in zip(a[rank][2:], c[rank]))
    # the two ranks read different samples
    assert not torch.equal(a[0][0], a[1][0])


def test_pretraining_sampler_partition():
    s0 = list(PretrainingSampler(20, 4, 2, 0, 2))
    s1 = list(PretrainingSampler(20, 4, 2, 1, 2))
    assert s0 == [[4, 5], [8, 9], [12, 13], [16, 17]]
    assert s1 == [[6, 7], [10, 11], [14, 15], [18, 19]]
    assert len(PretrainingSampler(20, 4, 2, 0, 2)) == 4
