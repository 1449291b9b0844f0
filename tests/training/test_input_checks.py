"""Start-up checks of the training job: checkpoint/model mismatches, --load, --data-path, token ids."""
from __future__ import annotations

import argparse

import pytest
import torch

from megatron_hybrid.checkpoint.storage import CheckpointError
from megatron_hybrid.checkpoint.training_state import check_load_dir, check_model_matches
from megatron_hybrid.config import preset_config
from megatron_hybrid.training.data import check_token_ids, parse_data_path
from tests.dist import run_distributed
from tests.training.pretrain_kit import flags as _flags
from tests.training.pretrain_kit import pretrain_worker as _pretrain_worker


def test_model_mismatch_lists_each_field_with_both_values():
    saved = preset_config("tiny", vocab_size=8192)
    current = preset_config("tiny", vocab_size=100278, hidden_size=128)
    with pytest.raises(CheckpointError) as err:
        check_model_matches({"model": saved.to_dict()}, current, "CKPT/iter_0000005")
    text = str(err.value)
    assert "--vocab-size: checkpoint 8192, this run 100278" in text
    assert "--padded-vocab-size: checkpoint 8192, this run 100352" in text
    assert "--hidden-size: checkpoint 256, this run 128" in text
    check_model_matches({"model": saved.to_dict()}, saved, "x")  # equal: no error


def test_load_dir_errors(tmp_path):
    assert check_load_dir(str(tmp_path), finetune=False) is False  # fresh run: start from scratch
    with pytest.raises(CheckpointError, match="--finetune --load"):
        check_load_dir(str(tmp_path), finetune=True)
    it = tmp_path / "iter_0000010"
    it.mkdir()
    with pytest.raises(CheckpointError, match="expected the checkpoint directory holding"):
        check_load_dir(str(it), finetune=False)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10\n")
    assert check_load_dir(str(tmp_path), finetune=True) is True


def test_data_path_parsing(tmp_path):
    a, b = str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")
    assert parse_data_path([a]) == ([a], None)
    assert parse_data_path(["3", a, "1", b]) == ([a, b], [3.0, 1.0])
    with pytest.raises(ValueError, match="looks like a blend weight"):
        parse_data_path(["0.5", a, b])
    with pytest.raises(ValueError, match="blend weight 'O.5' is not a positive number"):
        parse_data_path(["0.5", a, "O.5", b])
    with pytest.raises(ValueError, match="blend weight '-1'"):
        parse_data_path(["-1", a, "2", b])
    with pytest.raises(ValueError, match="without .bin/.idx"):
        parse_data_path([a + ".bin"])


def test_token_ids_outside_vocabulary_are_refused():
    args = argparse.Namespace(data_path=["d/A_text_document"], tokenizer_model="tok.model")
    check_token_ids({"tokens": torch.tensor([[0, 7]]), "labels": torch.tensor([[7, 1]])}, 8, args)
    with pytest.raises(ValueError, match="token id 100257 is outside the vocabulary"):
        check_token_ids({"tokens": torch.tensor([[0, 100257]])}, 8192, args)


@pytest.mark.distributed
def test_resume_refuses_other_vocabulary_and_optimizer_format(embedded_small, checkpoint_at_5):
    ckpt = checkpoint_at_5[0]
    flags = _flags(embedded_small, None, tp=2, pp=2, extra=["--load", ckpt,
                                                            "--make-vocab-size-divisible-by", "640"])
    with pytest.raises(CheckpointError, match="--padded-vocab-size: checkpoint 1024, this run 1280"):
        run_distributed(_pretrain_worker, 4, flags, tp=2, pp=2, timeout=300)
    flags = [f for f in _flags(embedded_small, None, tp=2, pp=2, extra=["--load", ckpt])
             if f != "--use-distributed-optimizer"]
    with pytest.raises(CheckpointError, match="--use-distributed-optimizer"):
        run_distributed(_pretrain_worker, 4, flags, tp=2, pp=2, timeout=300)


class _FakeOptimizer:
    def __init__(self):
        self.param_groups = [{"wd_mult": 1.0}]


def _scheduler(lr, iters):
    from megatron_hybrid.config.arguments import parse_args
    from megatron_hybrid.model_setup import build_scheduler

    args = parse_args(["--seq-length", "8", "--train-iters", str(iters), "--lr", str(lr),
                       "--mock-data", "--vocab-size", "10", "--lr-warmup-iters", "2"],
                      world_size=1)
    return build_scheduler(args, _FakeOptimizer())


def test_scheduler_resume_policies():
    from megatron_hybrid.checkpoint.training_state import load_scheduler_state

    saved = _scheduler(3e-3, 10)
    saved.step(increment=5)
    state = saved.state_dict()
    same = _scheduler(3e-3, 10)
    load_scheduler_state(same, state, "check", "CKPT")
    assert same.num_steps == 5 and same.optimizer.param_groups[0]["lr"] == \
        saved.optimizer.param_groups[0]["lr"]
    with pytest.raises(CheckpointError) as err:
        load_scheduler_state(_scheduler(1e-3, 20), state, "check", "CKPT")
    assert "--lr: checkpoint 0.003, flags 0.001" in str(err.value)
    assert "--lr-decay-iters: checkpoint 10, flags 20" in str(err.value)
    flags_win = _scheduler(1e-3, 20)
    load_scheduler_state(flags_win, state, "flags", "CKPT")
    assert (flags_win.max_lr, flags_win.lr_decay_steps, flags_win.num_steps) == (1e-3, 20, 5)
    ckpt_wins = _scheduler(1e-3, 20)
    load_scheduler_state(ckpt_wins, state, "checkpoint", "CKPT")
    assert (ckpt_wins.max_lr, ckpt_wins.lr_decay_steps, ckpt_wins.num_steps) == (3e-3, 10, 5)
