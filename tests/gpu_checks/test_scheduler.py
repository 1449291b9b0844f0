"""The multi-GPU check's first-fit wave scheduler (megatron_hybrid/gpu_checks/scheduler.py) and its
run matrix as ``--dry-run`` prints it: the wave counts docs/gpu.md states (8 GPUs 3 correctness
waves, 4 GPUs 5, 2 GPUs 6), disjoint device slices, a case after the one it needs, the budget."""
from __future__ import annotations

import contextlib
import io
import re

import pytest

from megatron_hybrid.gpu_checks import multi_gpu
from megatron_hybrid.gpu_checks.runner import Budget
from megatron_hybrid.gpu_checks.scheduler import Case, Waves, device_slices, plan_wave, run_waves


def _waves(devices, budget_s=1000, min_start_s=0, one=False, cpu=False):
    ran, skipped = [], []
    w = Waves("t", devices, Budget(budget_s), min_start_s, 60,
              run=lambda c, vis, tmo: ran.append((c.name, vis, tmo)) or 0,
              done=lambda c, rc, s, peers: None, skip=lambda c, why: skipped.append((c.name, why)),
              cpu=cpu, one_per_wave=one)
    return w, ran, skipped


def test_first_fit_keeps_list_order_and_waits_for_needs():
    cases = [Case("a", 4), Case("b", 1), Case("c", 2), Case("d", 2), Case("r", 1, needs="a")]
    wave, rest = plan_wave(cases, 8, one_per_wave=False)
    # a (4) + b (1) + c (2) = 7 of 8 GPUs; d (2) does not fit; r waits for a
    assert [c.name for c in wave] == ["a", "b", "c"] and [c.name for c in rest] == ["d", "r"]
    assert device_slices(wave, [str(i) for i in range(8)], cpu=False) == ["0,1,2,3", "4", "5,6"]
    wave, rest = plan_wave(rest, 8, one_per_wave=True)
    assert [c.name for c in wave] == ["d"] and [c.name for c in rest] == ["r"]


def test_run_waves_gives_disjoint_devices_and_the_capped_timeout():
    w, ran, skipped = _waves(["0", "1", "2"])
    n = run_waves([Case("x", 2), Case("y", 2), Case("z", 1, needs="x")], w)
    assert n == 2 and not skipped
    # wave 1: x (y does not fit the one GPU left, z waits for x); wave 2: y then z beside it
    assert [(name, vis) for name, vis, _ in ran] == [("x", "0,1"), ("y", "0,1"), ("z", "2")]
    assert all(tmo == 60 for _, _, tmo in ran)  # min(budget left ~1000 s, cap 60)
    w, ran, skipped = _waves(["cpu"] * 4, cpu=True)
    run_waves([Case("x", 2), Case("y", 1)], w)  # on the CPU one case per wave, no device list
    assert ran[0][1] == "" and len(ran) == 2


def test_cases_left_when_the_budget_runs_out_are_skipped():
    w, ran, skipped = _waves(["0"], budget_s=10, min_start_s=40)
    run_waves([Case("x", 1), Case("y", 1)], w)
    assert ran == [] and [s[0] for s in skipped] == ["x", "y"]
    assert skipped[0][1] == "skipped: time budget (--budget-s 10)"
    w, ran, skipped = _waves(["0"])
    run_waves([Case("big", 2)], w)
    assert skipped == [("big", "skipped: not schedulable")]


def _dry(argv, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = multi_gpu.main(["--dry-run", *argv])
    return rc, buf.getvalue()


@pytest.mark.parametrize("gpus, corr_waves, runs", [(8, 3, 10), (4, 5, 10), (2, 6, 8)])
def test_dry_run_waves_per_gpu_count(gpus, corr_waves, runs, monkeypatch, tmp_path):
    """runs: the initial-weights run, the 8 default layouts that fit (TP2 x PP2 needs 4), the resume."""
    out = tmp_path / "out"
    rc, text = _dry(["--num-gpus", str(gpus), "--out", str(out)], monkeypatch)
    assert rc == 0 and not out.exists()  # a dry run writes nothing
    assert len(re.findall(r"corr wave \d+", text)) == corr_waves
    commands = [ln for ln in text.splitlines() if "(dry run)" in ln and "torch.distributed.run" in ln]
    assert len(commands) == runs
    # every wave's slices are disjoint and within the machine
    for wave in re.findall(r"corr wave \d+ \(timeout \d+ s\): (.*)", text):
        used = [d for part in re.findall(r"\[([\d,]+)\]", wave) for d in part.split(",")]
        assert len(used) == len(set(used)) and all(int(d) < gpus for d in used)


def test_bad_settings_exit_2_naming_the_flag(monkeypatch, tmp_path, capsys):
    for argv in (["--iters", "5", "--save-at", "5"], ["--layouts", "tp3"], ["--rtol", "-1"],
                 ["--scaling-models", "13b"]):
        with pytest.raises(SystemExit) as err:
            multi_gpu.main(["--dry-run", "--num-gpus", "2", "--out", str(tmp_path / "o"), *argv])
        assert err.value.code == 2
        assert argv[0] in capsys.readouterr().err
    monkeypatch.setenv("LAYOUTS", "ref nope")
    with pytest.raises(SystemExit):
        multi_gpu.main(["--dry-run", "--num-gpus", "2"])
    assert "unknown layout 'nope'" in capsys.readouterr().err
