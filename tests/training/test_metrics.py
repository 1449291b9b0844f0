"""The training log: Megatron's line format, TensorBoard scalars and the optional W&B hook."""
from __future__ import annotations

import argparse
import re
import sys
import types

from megatron_hybrid.training.metrics import MetricsLogger


def _args(tmp_path, **kw):
    base = dict(log_interval=2, train_iters=100, global_batch_size=8, seq_length=128,
                world_size=4, tensorboard_dir=str(tmp_path / "tb"), wandb_project=None,
                wandb_exp_name=None, wandb_save_dir=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_console_line_keeps_megatron_format_and_tensorboard_gets_scalars(tmp_path, capsys):
    log = MetricsLogger(_args(tmp_path), flops_per_token=1e9, peak_tflops=989.4)
    log.add({"lm loss": 5.0, "z loss": 20.0}, seconds=0.5)
    log.add({"lm loss": 4.0, "z loss": 22.0}, seconds=1.5)
    line = log.log(10, 640, 3e-4, 1.2345)
    log.log_validation(10, {"lm loss": 4.5})
    log.close()
    out = capsys.readouterr().out
    assert line in out
    # Megatron-LM training_log fields, in its formats
    assert re.search(r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration       10/     100 \|", line)
    assert " consumed samples:          640 |" in line
    assert " elapsed time per iteration (ms): 1000.0 |" in line
    assert " learning rate: 3.000000E-04 |" in line
    assert " global batch size:     8 |" in line
    assert " lm loss: 4.500000E+00 | z loss: 2.100000E+01 |" in line
    assert " grad norm: 1.234 |" in line
    assert " number of skipped iterations:   0 |" in line
    # throughput: 8 x 128 tokens / 1.0 s / 4 GPUs = 256 tokens/s/GPU; x 1 GFLOP = 0.256 TFLOP/s
    assert " tokens per second per GPU: 256.0 |" in line
    assert " throughput per GPU (TFLOP/s/GPU): 0.256 |" in line
    assert " MFU: 0.03% |" in line  # 0.256 / 989.4
    assert " validation loss at iteration 10 | lm loss value: 4.500000E+00 |" in out
    assert log.history == [(10, 4.5)]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lm loss", "z loss", "learning-rate", "grad-norm", "tokens-per-sec-per-gpu",
            "mfu", "lm loss validation"} <= tags
    assert acc.Scalars("lm loss")[0].value == 4.5 and acc.Scalars("lm loss")[0].step == 10


def test_wandb_used_when_installed(tmp_path, monkeypatch):
    calls = []
    stub = types.ModuleType("wandb")

    class Run:
        def log(self, data, step):
            calls.append(("log", step, dict(data)))

        def finish(self):
            calls.append(("finish",))

    def init(project, name, dir, config):
        calls.append(("init", project, name))
        return Run()

    stub.init = init
    monkeypatch.setitem(sys.modules, "wandb", stub)
    log = MetricsLogger(_args(tmp_path, tensorboard_dir=None, wandb_project="olmo",
                              wandb_exp_name="run1"), 1e9, None)
    log.add({"lm loss": 3.0}, seconds=1.0)
    log.log(2, 16, 1e-3, None)
    log.close()
    assert calls[0] == ("init", "olmo", "run1")
    assert calls[1][0] == "log" and calls[1][1] == 2 and calls[1][2]["lm loss"] == 3.0
    assert "mfu" not in calls[1][2]  # no peak known: MFU not reported
    assert calls[-1] == ("finish",)
