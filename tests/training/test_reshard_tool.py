"""``--no-dist-ckpt-optim-fully-reshardable`` (dp_reshardable optimizer checkpoints) and
``tools/reshard_checkpoint.py`` (megatron_hybrid.checkpoint.reshard).

The small Olmo Hybrid of pretrain_kit.py on the embedded corpus, saved dp_reshardable at
TP=2 x PP=2 at iteration 5; compared with the session's uninterrupted run (``reference_losses``)
and with the fully reshardable checkpoint of the same 5 iterations resumed at TP=1 x PP=2
(``resumed_at_tp1_pp2``).
"""
from __future__ import annotations

import os
import types

import pytest
import yaml
from megatron.core import dist_checkpointing

from megatron_hybrid.checkpoint import reshard
from megatron_hybrid.checkpoint import reshard_cli as tool  # tools/reshard_checkpoint.py's main
from megatron_hybrid.checkpoint import training_state as ckpt_mod
from megatron_hybrid.checkpoint.storage import (
    RUN_CONFIG,
    TRACKER,
    CheckpointError,
    iteration_dir,
    read_run_config,
    read_tracker,
)
from megatron_hybrid.config.arguments import model_config_from_args, parse_args
from megatron_hybrid.training.train import RECORDED_FLAGS
from tests.dist import run_distributed
from tests.training.pretrain_kit import copy_checkpoint as _copy
from tests.training.pretrain_kit import flags as _flags
from tests.training.pretrain_kit import last_stage_losses as _losses
from tests.training.pretrain_kit import pretrain_worker as _pretrain_worker

DP_FLAG = "--no-dist-ckpt-optim-fully-reshardable"


@pytest.fixture(scope="module")
def dp_checkpoint_at_5(embedded_small, tmp_path_factory):
    """(directory, losses 1..5) of a TP=2 x PP=2 run saved dp_reshardable at iteration 5."""
    ckpt = str(tmp_path_factory.mktemp("dp_ckpt5") / "ckpt")
    flags = _flags(embedded_small, ckpt, tp=2, pp=2,
                   extra=["--exit-interval", "5", "--save-interval", "5", DP_FLAG])
    return ckpt, _losses(run_distributed(_pretrain_worker, 4, flags, tp=2, pp=2, timeout=300))


def _layout(tp, pp, dp=1):
    return {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "data_parallel_size": dp, "context_parallel_size": 1}


@pytest.mark.slow
@pytest.mark.distributed
def test_dp_reshardable_resume_at_same_layout_is_exact(embedded_small, reference_losses,
                                                       dp_checkpoint_at_5, tmp_path):
    ckpt, head = dp_checkpoint_at_5
    ckpt = _copy(ckpt, tmp_path)
    saved = read_run_config(ckpt)
    assert saved["optimizer_format"] == "dp_reshardable"
    assert saved["training"]["dist_ckpt_optim_fully_reshardable"] is False
    assert saved["parallel"] == _layout(2, 2)
    # the optimizer state is stored per DDP bucket (the layout-dependent format)
    keys = dist_checkpointing.load_tensors_metadata(iteration_dir(ckpt, 5)).keys()
    assert any(".bucket_idx_0.exp_avg" in k for k in keys), sorted(keys)[:5]
    # Resumed with the default flag: the checkpoint's own format is read, the next save is in
    # the flag's format.
    tail = _losses(run_distributed(_pretrain_worker, 4, _flags(embedded_small, ckpt, tp=2, pp=2),
                                   tp=2, pp=2, timeout=300))
    assert head == reference_losses[:5]
    assert tail == reference_losses[5:], "a dp_reshardable resume must repeat the losses exactly"
    assert read_tracker(ckpt) == 10
    assert read_run_config(ckpt)["optimizer_format"] == "fully_reshardable"


@pytest.mark.distributed
def test_dp_reshardable_resume_at_another_tp_is_refused(embedded_small, dp_checkpoint_at_5,
                                                        tmp_path):
    ckpt = _copy(dp_checkpoint_at_5[0], tmp_path)
    with pytest.raises(CheckpointError) as err:
        run_distributed(_pretrain_worker, 2, _flags(embedded_small, ckpt, tp=1, pp=2), pp=2,
                        timeout=300)
    msg = str(err.value)
    print(msg)
    assert "\n" not in msg
    assert "saved with --no-dist-ckpt-optim-fully-reshardable) at TP=2 x PP=2 x DP=1" in msg
    assert "this run is TP=1 x PP=2 x DP=1" in msg
    assert (f"python tools/reshard_checkpoint.py --load {ckpt} --save {ckpt}_tp1_pp2 "
            f"--target-tensor-parallel-size 1 --target-pipeline-parallel-size 2") in msg
    assert read_tracker(ckpt) == 5


@pytest.mark.slow
@pytest.mark.distributed
def test_reshard_tool_dp_reshardable_tp2pp2_to_tp1pp2(embedded_small, dp_checkpoint_at_5,
                                                      checkpoint_at_5, resumed_at_tp1_pp2,
                                                      tmp_path, capsys):
    src, head = dp_checkpoint_at_5
    assert head == checkpoint_at_5[1]  # the same 5 iterations, saved in the two formats
    out = str(tmp_path / "resharded")
    summary = reshard.reshard_checkpoint(src, out, 1, 2)
    text = capsys.readouterr().out
    print(text)
    assert (summary["source_format"], summary["target_format"]) == ("dp_reshardable",) * 2
    assert [p.split(" (")[0] for p in text.splitlines() if p.startswith("phase")] == \
        ["phase 1", "phase 2"]
    source_state = dist_checkpointing.load_common_state_dict(iteration_dir(src, 5))
    for phase in summary["phases"]:
        # DP=1: per main param its fp32 value, exp_avg, exp_avg_sq and step
        assert phase["model"] > 0 and phase["optimizer"] == 4 * phase["model"], phase
        assert phase["train_state"] == source_state["train_state"]
    assert summary["verified"] == summary["phases"][-1]["model"] + \
        summary["phases"][-1]["optimizer"]
    assert f"verified: {summary['verified']} tensors bit-exact at TP=1 x PP=2 x DP=1" in text
    assert sorted(os.listdir(out)) == ["iter_0000005", TRACKER] and read_tracker(out) == 5
    assert not [n for n in os.listdir(tmp_path) if "reshard-" in n]  # temporaries removed
    before, after = read_run_config(src), read_run_config(out)
    assert after["parallel"] == _layout(1, 2)
    assert after["optimizer_format"] == "dp_reshardable" and after["has_rng_state"] is False
    assert after["resharded_from"]["parallel"] == {k: v for k, v in _layout(2, 2).items()
                                                   if k != "context_parallel_size"}
    for key in ("model", "tokenizer", "training", "iteration", "has_optimizer_state"):
        assert after[key] == before[key], key
    # Resume at the target layout: the same as resuming the fully reshardable checkpoint there.
    tail = _losses(run_distributed(_pretrain_worker, 2, _flags(embedded_small, out, tp=1, pp=2),
                                   pp=2, timeout=300))
    diff = max(abs(a - b) for a, b in zip(tail, resumed_at_tp1_pp2, strict=True))
    print(f"resharded dp_reshardable vs fully_reshardable resume at TP1xPP2: max |dloss| = "
          f"{diff:.3e}, identical: {tail == resumed_at_tp1_pp2}")
    assert len(tail) == 5 and tail == resumed_at_tp1_pp2, (diff, tail, resumed_at_tp1_pp2)


@pytest.mark.distributed
def test_reshard_tool_weights_only_and_failed_verification(embedded_small, dp_checkpoint_at_5,
                                                           reference_losses, tmp_path,
                                                           monkeypatch):
    """A checkpoint without optimizer state (run_config as --no-save-optim writes it) is copied
    with the new layout; a failed verification leaves --save absent and no temporaries."""
    src = _copy(dp_checkpoint_at_5[0], tmp_path)
    path = os.path.join(iteration_dir(src, 5), RUN_CONFIG)
    config = read_run_config(src)
    config.update(has_optimizer_state=False)
    config.pop("optimizer_format")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    out = str(tmp_path / "weights")
    monkeypatch.setattr(reshard, "_compare", lambda before, after: {
        "model": 0, "optimizer": 0, "other": 0, "mismatches": ["model.injected"]})
    with pytest.raises(CheckpointError, match="verification failed.*model.injected"):
        reshard.reshard_checkpoint(src, out, 1, 1)
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if "reshard-" in n]
    monkeypatch.undo()
    summary = reshard.reshard_checkpoint(src, out, 1, 1)
    assert summary["phases"][0]["model"] > 0 and summary["phases"][0]["optimizer"] == 0
    after = read_run_config(out)
    assert after["parallel"] == _layout(1, 1) and after["has_rng_state"] is False
    assert "optimizer_format" not in after and after["model"] == config["model"]
    # It resumes weights-only at the target layout (RNG not requested): iteration 6's forward
    # uses the weights of iteration 5.
    flags = _flags(embedded_small, None, extra=["--load", out, "--no-load-optim",
                                                "--exit-interval", "6"])
    (got,) = [r for r in run_distributed(_pretrain_worker, 1, flags, timeout=300) if r]
    assert len(got) == 1 and abs(got[0] - reference_losses[5]) < 1e-4, (got, reference_losses)


# --- in-process: flags, refusals and errors --------------------------------------------------
def _fake_checkpoint(root: str, tp=2, pp=2, fmt="dp_reshardable") -> dict:
    """A checkpoint directory with the tracker and run_config.yaml only (enough to plan)."""
    data = types.SimpleNamespace(data_prefix="corpus", tokenizer_model="tok.model")
    args = parse_args(_flags(data, tp=tp, pp=pp), world_size=tp * pp)
    config = {"format": "torch_dist", "iteration": 5,
              "model": model_config_from_args(args, 1024).to_dict(),
              "parallel": _layout(tp, pp), "training": {k: getattr(args, k) for k in
                                                        RECORDED_FLAGS},
              "has_optimizer_state": True, "optimizer_format": fmt}
    os.makedirs(iteration_dir(root, 5))
    with open(os.path.join(iteration_dir(root, 5), RUN_CONFIG), "w") as f:
        yaml.safe_dump(config, f)
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write("5\n")
    return config


def test_worker_args_rebuild_the_recorded_training_flags(tmp_path):
    config = _fake_checkpoint(str(tmp_path / "c"))
    args = reshard.worker_args(config, (1, 2, 3))
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.data_parallel_size) == (1, 2, 3)
    for name in reshard._VALUE_FLAGS + reshard._SWITCH_FLAGS:
        assert getattr(args, name) == config["training"][name], name


def test_check_optimizer_layout_allows_dp_change_only(monkeypatch):
    config = {"optimizer_format": "dp_reshardable", "parallel": _layout(2, 2)}
    for current, refused in ((_layout(2, 2, 4), False), (_layout(1, 2), True),
                             (_layout(2, 1, 2), True)):
        monkeypatch.setattr(ckpt_mod, "current_layout", lambda c=current: c)
        if refused:
            with pytest.raises(CheckpointError, match="reshard_checkpoint.py"):
                ckpt_mod.check_optimizer_layout(config, "/c", "/c/iter_0000005")
        else:
            ckpt_mod.check_optimizer_layout(config, "/c", "/c/iter_0000005")
        # fully reshardable (also: older checkpoints without the key) loads anywhere
        ckpt_mod.check_optimizer_layout({**config, "optimizer_format": "fully_reshardable"},
                                        "/c", "/c/iter_0000005")
        ckpt_mod.check_optimizer_layout({"parallel": _layout(2, 2)}, "/c", "/c/iter_0000005")
    with pytest.raises(CheckpointError, match="optimizer_format 'bogus'"):
        ckpt_mod.saved_optimizer_format({"optimizer_format": "bogus"})


def test_reshard_tool_errors(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    _fake_checkpoint(ckpt)
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    out = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "missing"), out, 1, 2], "no such directory"),
        ([str(tmp_path / "empty"), out, 1, 2], f"{TRACKER} not found"),
        ([ckpt, out, 1, 2, "--iteration", "7"], "iteration 7 not found"),
        ([ckpt, out, 3, 2], "--target-tensor-parallel-size 3 does not divide "
                            "--num-attention-heads = 2"),
        ([ckpt, out, 4, 2], "allowed values for this model: [1, 2]"),
        ([ckpt, out, 2, 3], "--num-layers 4 is not divisible by --target-pipeline-parallel-size 3"),
        ([ckpt, out, 1, 9], "--target-pipeline-parallel-size 9 must be in"),
        ([ckpt, str(tmp_path / "taken"), 1, 2], "exists and is not an empty directory"),
        ([ckpt, ckpt, 1, 2], "exists and is not an empty directory"),
    ]
    for (load, save, tp, pp, *rest), expected in cases:
        code = tool.main(["--load", load, "--save", save, "--target-tensor-parallel-size",
                          str(tp), "--target-pipeline-parallel-size", str(pp), *rest])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and err[0].startswith("error: "), (code, err)
        assert expected in err[0], (expected, err[0])
        assert not os.path.exists(out)
