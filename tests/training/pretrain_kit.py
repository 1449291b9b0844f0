"""Shared pieces of the end-to-end training tests: flags for a small model on the embedded
corpus, the forked worker that runs ``pretrain``, and session fixtures (reference losses of an
uninterrupted TP=2 x PP=2 run; a checkpoint saved at iteration 5) in tests/training/conftest.py.
"""
from __future__ import annotations

import shutil

import megatron.core.parallel_state as ps

from megatron_hybrid.training.train import pretrain


def flags(data, ckpt=None, tp=1, pp=1, iters=10, extra=()):
    """pretrain flags: 4-layer Olmo Hybrid (3 GDN + 1 attention, d=64), sequence 32, global
    batch 8, distributed optimizer, on the EmbeddedDefault ``data``."""
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


def with_data_path(argv, prefix):
    """``argv`` (a ``flags`` list) with ``--data-path`` set to ``prefix``."""
    argv = list(argv)
    argv[argv.index("--data-path") + 1] = prefix
    return argv


def pretrain_worker(rank, argv):
    """Run pretrain(argv) in a forked rank; per-iteration lm losses on one last-stage rank."""
    out = pretrain(argv)
    return out["last_losses"] if ps.is_pipeline_last_stage() and \
        ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0 else None


def last_stage_losses(results):
    """The one non-None entry of run_distributed results."""
    return next(r for r in results if r is not None)


def copy_checkpoint(ckpt, tmp_path):
    """Copy a checkpoint directory into tmp_path/ckpt (tests resume from private copies)."""
    dst = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, dst)
    return dst


