"""The typed training configuration (config/training.py) and the flags generated from it.

The reference is the hand-written parser and validation before the typed config
(tests/config/arguments_before_typed_config.py, a verbatim copy): every flag keeps its option
strings, dest, default, type, choices, nargs and action, and the same argv validates to the same
values. A short pretrain run leaves its config unchanged.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os

import pytest

from megatron_hybrid.config import arguments as new
from megatron_hybrid.config.flags import HelpFormatter, flag_table
from megatron_hybrid.config.training import GROUPS, RECORDED_FLAGS, OptimizerArgs, TrainingConfig
from tests.config import arguments_before_typed_config as old

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the shape flags the old parser added in a loop without help text
SHAPE_FLAGS = ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
               "--num-query-groups", "--kv-channels", "--linear-num-key-heads",
               "--linear-num-value-heads", "--linear-key-head-dim", "--linear-value-head-dim",
               "--linear-conv-kernel-dim", "--rotary-base", "--norm-epsilon",
               "--make-vocab-size-divisible-by", "--init-method-std", "--max-position-embeddings")
BASE = ["--seq-length", "16", "--train-iters", "20", "--lr", "1e-3", "--mock-data",
        "--vocab-size", "128"]


def _actions(parser) -> dict[tuple[str, ...], argparse.Action]:
    return {tuple(a.option_strings): a for a in parser._actions
            if not isinstance(a, argparse._HelpAction)}


def _signature(a: argparse.Action) -> tuple:
    return (a.dest, a.default, a.type, a.choices, a.nargs, a.required, type(a).__name__, a.const)


def test_generated_flags_match_the_hand_written_parser():
    before, after = _actions(old.build_parser()), _actions(new.build_parser())
    assert sorted(after) == sorted(before)
    for names, action in before.items():
        assert _signature(after[names]) == _signature(action), names
    assert len(before) == 99  # the old parser: 97 settings, 2 of them with a --no-/--tie- twin


def test_every_flag_has_help_and_help_shows_every_default():
    parser = new.build_parser()
    formatter = HelpFormatter("pretrain_olmo_hybrid.py")
    text = " ".join(parser.format_help().split())
    for names, action in _actions(parser).items():
        assert action.help and len(action.help) > 10, names
        line = formatter._get_help_string(action)
        assert "(default: " in line or "(required)" in line, names
    # the raw defaults the old parser had, where the flag shows no explanation instead
    for names, action in _actions(old.build_parser()).items():
        explained = getattr(_actions(parser)[names], "default_text", None)
        if action.default is not None and explained is None and not action.required:
            assert f"(default: {action.default})" in text, names
    for flag in ("--seq-length", "--train-iters", "--lr"):
        assert _actions(parser)[(flag,)].required


def test_shape_flags_say_what_they_are_and_that_they_override_the_preset():
    before, after = _actions(old.build_parser()), _actions(new.build_parser())
    for flag in SHAPE_FLAGS:
        assert before[(flag,)].help is None  # the gap this closes
        help_text = after[(flag,)].help
        assert "overrides the preset" in help_text and "HF " in help_text, flag


def test_every_setting_is_documented():
    for f in dataclasses.fields(TrainingConfig):
        assert f.metadata.get("help"), f.name
    group_fields = [f.name for _, cls in GROUPS for f in dataclasses.fields(cls)]
    assert len(group_fields) == len(set(group_fields))  # one group per flag


ARGVS = [
    BASE,
    BASE + ["--lr-warmup-fraction", "0.1", "--lr-decay-iters", "15", "--min-lr", "1e-4"],
    BASE + ["--recompute-granularity", "full", "--intra-document-masking", "--sequence-parallel"],
    BASE + ["--model-preset", "tiny", "--num-layers", "4", "--no-linear-allow-neg-eigval",
            "--tie-embeddings-and-output-weights", "--no-dist-ckpt-optim-fully-reshardable"],
    BASE + ["--hybrid-override-pattern", "G-*-", "--no-skip-step", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--tensor-model-parallel-size", "2",
            "--use-distributed-optimizer", "--overlap-param-gather"],
    ["--seq-length", "8", "--train-iters", "3", "--lr", "1", "--data-path", "0.5", "a", "0.5",
     "b", "--tokenizer-model", "tok.model", "--override-opt-param-scheduler", "--save", "s",
     "--save-interval", "2", "--skip-step"],
]


@pytest.mark.parametrize("argv", ARGVS)
def test_validation_resolves_what_it_resolved_before(argv):
    want = vars(old.parse_args(list(argv), world_size=4))
    got = new.parse_args(list(argv), world_size=4)
    assert got.to_dict() == want
    # run_config.yaml's ``training`` section: the same keys and values as checkpoints before
    assert {k: getattr(got, k) for k in RECORDED_FLAGS} == {k: want[k] for k in RECORDED_FLAGS}


@pytest.mark.parametrize("extra", [
    ["--lr-warmup-iters", "3", "--lr-warmup-fraction", "0.1"],
    ["--global-batch-size", "3"],
    ["--save-interval", "5"],
    ["--recompute-method", "block"],
    ["--reset-attention-mask"],
    ["--skip-step-window", "1"],
    ["--overlap-param-gather"],
    ["--fla-warmup-workers", "-1"],
    ["--micro-batch-size", "0"],
])
def test_invalid_combinations_fail_with_the_same_message(extra):
    with pytest.raises(old.ArgumentError) as before:
        old.parse_args(BASE + extra, world_size=2)
    with pytest.raises(new.ArgumentError) as after:
        new.parse_args(BASE + extra, world_size=2)
    assert str(after.value) == str(before.value)


def test_config_is_frozen_and_validation_leaves_the_parsed_flags_alone():
    ns = new.build_parser().parse_args(BASE + ["--lr-warmup-fraction", "0.25"])
    parsed = dict(vars(ns))
    cfg = new.validate_args(ns, world_size=1)
    assert vars(ns) == parsed
    assert (cfg.lr_warmup_iters, cfg.lr_decay_iters, cfg.global_batch_size) == (5, 20, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    opt = cfg.group(OptimizerArgs)
    assert (opt.lr, opt.adam_beta2) == (1e-3, 0.95)
    assert set(cfg.flag_values()) == {d.dest for d in new.build_parser()._actions} - {"help"}


def test_docs_flag_table_is_the_generated_one():
    with open(os.path.join(REPO, "docs", "training.md"), encoding="utf-8") as f:
        doc = f.read()
    assert flag_table(GROUPS) in doc, "docs/training.md: regenerate the flag reference with " \
        "python -c 'from megatron_hybrid.config.flags import flag_table; from " \
        "megatron_hybrid.config.training import GROUPS; print(flag_table(GROUPS))'"


def _recording_worker(rank, argv):
    """pretrain(argv) with its config captured: (config before the run, after the run)."""
    from megatron_hybrid.training import train

    seen = {}
    real = train.parse_args

    def parse(argv_):
        seen["cfg"] = real(argv_)
        seen["before"] = copy.deepcopy(seen["cfg"].to_dict())
        return seen["cfg"]

    train.parse_args = parse
    out = train.pretrain(argv)
    return seen["before"], seen["cfg"].to_dict(), out["iteration"]


def test_a_short_pretrain_run_leaves_its_config_unchanged(embedded_small, tmp_path):
    from tests.dist import run_distributed
    from tests.training.pretrain_kit import flags

    argv = flags(embedded_small, str(tmp_path / "ckpt"), iters=3,  # > the flags' 2 warmup iters
                 extra=["--eval-interval", "1", "--save-interval", "1"])
    ((before, after, iteration),) = run_distributed(_recording_worker, 1, argv, timeout=300)
    assert iteration == 3
    assert after == before
    assert before["num_microbatches"] == 4  # global batch 8 / (micro-batch 2 x DP 1)
