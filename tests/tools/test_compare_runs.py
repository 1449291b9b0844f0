"""tools/compare_runs.py on small synthetic logs in the trainer's real line format (no training).

* Lines written by the trainer's own MetricsLogger parse back to the logged losses.
* Equal runs and runs within the relative tolerance pass; a run beyond it fails at the first
  iteration beyond, naming it and both values; non-finite losses fail.
* Missing iterations (a crashed run, an empty log, a short reference, a resumed run) are named
  with where the log starts and ends, a timeout, and the log's first error line (not torchrun's
  summary).
* Repeated iterations (a relaunch) take the last value; --iterations, NAME=LOG labels,
  --no-header and --json; bad arguments exit 2 with a one-line message: a missing or unreadable
  log, a --metric no log holds, an unwritable --json (checked before comparing).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

import pytest

from megatron_hybrid.training import compare_runs as cr

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))




def line(it: int, loss, total: int = 5) -> str:
    """An iteration line as metrics.MetricsLogger.log prints it (CPU: peak-rss-gib)."""
    value = loss if isinstance(loss, str) else f"{loss:.6E}"
    return (f" [2026-11-29 15:08:10] iteration {it:8d}/{total:8d} | consumed samples: "
            f"{8 * it:12d} | elapsed time per iteration (ms): 2551.7 | throughput per GPU "
            f"(TFLOP/s/GPU): 0.050 | tokens per second per GPU: 802.6 | learning rate: "
            f"6.000000E-04 | global batch size:     8 | lm loss: {value} | z loss: "
            f"8.210738E+01 | loss scale: 1.0 | grad norm: 4.599 | peak-rss-gib: 0.82 | number of "
            f"skipped iterations:   0 | number of nan iterations:   0 |")


REF = [9.060015, 8.911698, 8.77, 8.61, 8.5]


def write_log(tmp_path, name, losses, extra_before="", extra_after="", first=1, total=5):
    text = " > training from iteration 0 to 5\n" + extra_before
    text += "\n".join(line(first + i, v, total) for i, v in enumerate(losses)) + "\n"
    text += extra_after
    path = tmp_path / f"{name}.log"
    path.write_text(text)
    return str(path)


def run_main(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cr.main(argv)
    return rc, buf.getvalue()


def test_parses_real_lines_and_ignores_validation_and_warnings():
    text = "\n".join([
        "WARNING: --wandb-project given but wandb is not installed",
        line(1, 9.060015), line(2, 8.911697),
        "-" * 40,
        " validation loss at iteration 2 | lm loss value: 8.700000E+00 | lm loss PPL: 6.0E+03 |",
        "-" * 40,
        " > saved checkpoint at iteration 2 to /tmp/ck",
        line(3, 8.876215),
    ])
    p = cr.parse_log_text(text)
    assert p.values == {1: 9.060015, 2: 8.911697, 3: 8.876215}
    assert p.first_error is None and p.repeated == [] and p.last_iteration == 3


def test_lines_written_by_the_trainers_metrics_logger_parse_back():
    from megatron_hybrid.training.metrics import MetricsLogger

    args = argparse.Namespace(log_interval=1, train_iters=3, global_batch_size=8, seq_length=256,
                              world_size=1, tensorboard_dir=None, wandb_project=None)
    logger = MetricsLogger(args, flops_per_token=1e9, peak_tflops=989.4)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        for it, loss in ((1, 9.06001549), (2, 8.9116971), (3, 1.25e-3)):
            logger.add({"lm loss": loss, "z loss": 82.1}, seconds=0.5)
            logger.log(it, 8 * it, 6e-4, grad_norm=4.6)
    p = cr.parse_log_text(buf.getvalue())
    assert sorted(p.values) == [1, 2, 3]
    assert p.values[1] == pytest.approx(9.06001549, rel=1e-6)
    assert p.values[3] == pytest.approx(1.25e-3, rel=1e-6)
    assert cr.parse_log_text(buf.getvalue(), metric="z loss").values[2] == pytest.approx(82.1)


def test_equal_and_within_tolerance_pass(tmp_path):
    ref = write_log(tmp_path, "ref", REF)
    same = write_log(tmp_path, "same", REF)
    close = write_log(tmp_path, "close", [v * (1 + 5e-4) for v in REF])
    rc, out = run_main(["--reference", ref, same, "TP2 + SP=" + close])
    assert rc == 0, out
    rows = [r for r in out.splitlines() if r.startswith("| same") or r.startswith("| TP2 + SP")]
    assert len(rows) == 2 and all(r.rstrip().endswith("| pass |") for r in rows)
    c = cr.compare("close", cr.parse_log(close), "ref", cr.parse_log(ref))
    assert c.passed and c.compared == 5 and c.max_rel_diff == pytest.approx(5e-4, rel=1e-3)


def test_mismatch_fails_at_the_first_iteration_beyond_the_tolerance(tmp_path):
    ref = write_log(tmp_path, "ref", REF)
    bad = list(REF)
    bad[2] = REF[2] * (1 + 3e-3)   # iteration 3: 3e-3 relative
    bad[4] = REF[4] * (1 + 1e-2)   # iteration 5: larger, but later
    badp = write_log(tmp_path, "pp2", bad)
    rc, out = run_main(["--reference", "ref=" + ref, "--rtol", "1e-3", badp])
    assert rc == 1
    row = next(r for r in out.splitlines() if r.startswith("| pp2 |"))
    assert "FAIL: iteration 3: 8.79631 vs reference 8.77" in row
    assert "(5)" in row  # the largest absolute difference is at iteration 5
    # a looser tolerance accepts the same run
    rc, _ = run_main(["--reference", ref, "--rtol", "2e-2", badp])
    assert rc == 0


def test_absolute_tolerance_and_non_finite_values(tmp_path):
    ref = write_log(tmp_path, "ref", REF)
    off = write_log(tmp_path, "off", [v + 2e-3 for v in REF])
    assert not cr.compare("off", cr.parse_log(off), "ref", cr.parse_log(ref), rtol=0.0).passed
    assert cr.compare("off", cr.parse_log(off), "ref", cr.parse_log(ref), rtol=0.0,
                      atol=3e-3).passed
    nan = write_log(tmp_path, "nan", REF[:3] + ["NAN"] + REF[4:])
    c = cr.compare("nan", cr.parse_log(nan), "ref", cr.parse_log(ref))
    assert not c.passed and "iteration 4: non-finite lm loss" in c.result


TORCHRUN_FOOTER = """Traceback (most recent call last):
  File "/usr/lib/python3/site-packages/torch/distributed/run.py", line 903, in main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
pretrain_olmo_hybrid.py FAILED
------------------------------------------------------------
  exitcode  : 1 (pid: 22391)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def test_missing_iterations_are_named_with_where_the_log_ends_and_the_first_error(tmp_path):
    ref = write_log(tmp_path, "ref", REF)
    crashed = write_log(
        tmp_path, "tp2", REF[:3],
        extra_after="[rank1]: Traceback (most recent call last):\n"
                    "[rank1]: torch.distributed.DistBackendError: NCCL error in: ...\n"
                    "[rank0]: RuntimeError: a later consequence\n" + TORCHRUN_FOOTER)
    rc, out = run_main(["--reference", ref, "--iterations", "1-5", crashed])
    assert rc == 1
    row = next(r for r in out.splitlines() if r.startswith("| tp2 |"))
    assert "FAIL: run lacks iterations 4-5 (log ends at iteration 3)" in row
    assert "first error: [rank1]: torch.distributed.DistBackendError: NCCL error" in row
    assert "1-5 (3 compared)" in row
    timed_out = write_log(tmp_path, "pp2", REF[:2],
                          extra_after="# exit status 124 (timed out after 300 s)\n")
    c = cr.compare("pp2", cr.parse_log(timed_out), "ref", cr.parse_log(ref))
    assert "run lacks iterations 3-5 (log ends at iteration 2, timed out)" in c.result


def test_empty_log_and_short_reference(tmp_path):
    ref = write_log(tmp_path, "ref", REF)
    empty = tmp_path / "empty.log"
    empty.write_text("pretrain_olmo_hybrid.py: error: --seq-length 1001 must be divisible by "
                     "--context-parallel-size 2\n" + TORCHRUN_FOOTER)
    c = cr.compare("cp2", cr.parse_log(str(empty)), "ref", cr.parse_log(ref))
    assert not c.passed
    assert "lacks iterations 1-5 (no iteration lines in the log)" in c.result
    rc, out = run_main(["--reference", ref, "cp2=" + str(empty)])
    assert rc == 1 and f"run lacks iterations 1-5 (no iteration lines in {empty})" in out
    assert "must be divisible by --context-parallel-size 2" in c.result
    short_ref = write_log(tmp_path, "short_ref", REF[:2])
    full = write_log(tmp_path, "full", REF)
    c = cr.compare("full", cr.parse_log(full), "ref", cr.parse_log(short_ref), iterations=(1, 5))
    assert not c.passed and "reference lacks iterations 3-5 (log ends at iteration 2)" in c.result
    c = cr.compare("full", cr.parse_log(full), "ref", cr.parse_log(str(tmp_path / "none.log")))
    assert not c.passed and "reference log not found" in c.result


def test_dev_null_is_an_empty_log_not_a_missing_one(tmp_path):
    if not os.path.exists(os.devnull):
        pytest.skip("no /dev/null")
    ref = write_log(tmp_path, "ref", REF)
    rc, out = run_main(["--reference", ref, os.devnull])
    assert rc == 1
    assert f"FAIL: run lacks iterations 1-5 (no iteration lines in {os.devnull})" in out
    assert "not found" not in out


def test_missing_or_unreadable_logs_are_bad_arguments(tmp_path, capsys):
    ref = write_log(tmp_path, "ref", REF)
    never = str(tmp_path / "never_ran.log")
    rc, out = run_main(["--reference", ref, "tp2=" + never])
    err = capsys.readouterr().err
    assert rc == 2 and out == ""
    assert err == f"compare_runs.py: error: run log {never}: no such file\n"
    rc, out = run_main(["--reference", never, ref])
    assert rc == 2 and "--reference log " + never + ": no such file" in capsys.readouterr().err
    rc, out = run_main(["--reference", ref, str(tmp_path)])
    assert rc == 2 and "is a directory" in capsys.readouterr().err


def test_unknown_metric_is_a_bad_argument_naming_the_logged_ones(tmp_path, capsys):
    ref = write_log(tmp_path, "ref", REF)
    run = write_log(tmp_path, "run", REF)
    rc, out = run_main(["--reference", ref, "--metric", "loss", run])
    err = capsys.readouterr().err
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "--metric 'loss': no iteration line of the logs holds it" in err
    assert "'lm loss'" in err and "'z loss'" in err and "'grad norm'" in err
    # names as logged work; so does a metric only some iterations lack (skipped updates)
    rc, out = run_main(["--reference", ref, "--metric", "z loss", run])
    assert rc == 0, out
    rc, out = run_main(["--reference", ref, "--metric", "grad norm", run])
    assert rc == 0, out
    # logs without any iteration line cannot tell: the runs fail, the metric is not blamed
    crashed = tmp_path / "crashed.log"
    crashed.write_text("RuntimeError: boom\n")
    rc, out = run_main(["--reference", str(crashed), "--metric", "loss", str(crashed)])
    assert rc == 1 and "no iteration line with loss" in out
    assert "default: 'lm loss'" in " ".join(cr.build_parser().format_help().split())


def test_iteration_range_against_a_resumed_run(tmp_path):
    ref = write_log(tmp_path, "ref", REF)
    resumed = write_log(tmp_path, "resume", REF[3:], first=4)   # iterations 4-5 only
    rc, out = run_main(["--reference", ref, "--iterations", "4-5", "--no-header",
                        "--json", str(tmp_path / "r.json"), "resume_tp1=" + resumed])
    assert rc == 0
    assert not out.startswith("| run |") and out.count("\n") == 1
    assert "| resume_tp1 | ref | 4-5 (2 compared) |" in out
    (rec,) = json.loads((tmp_path / "r.json").read_text())
    assert rec["passed"] and rec["compared"] == 2 and rec["run"] == "resume_tp1"
    # without --iterations the reference's 1-5 are expected
    rc, out = run_main(["--reference", ref, resumed])
    assert rc == 1 and "run lacks iterations 1-3 (log starts at iteration 4)" in out
    assert "log ends" not in out


def test_a_resumed_run_that_ended_early_names_both_ends(tmp_path):
    ref = write_log(tmp_path, "ref", [9.0 - 0.1 * i for i in range(20)], total=20)
    resumed = write_log(tmp_path, "resume", [8.6, 8.5], first=5, total=20,
                        extra_after="# exit status 124 (timed out after 300 s)\n")
    c = cr.compare("resume", cr.parse_log(resumed), "ref", cr.parse_log(ref))
    assert not c.passed and c.compared == 2
    assert ("FAIL: run lacks iterations 1-4 (log starts at iteration 5) and 7-20 (log ends at "
            "iteration 6, timed out)") == c.result
    # a gap inside the log (a relaunch that skipped some) is named as such
    text = "\n".join([line(1, 9.0), line(2, 8.9), line(5, 8.6)])
    c = cr.compare("gap", cr.parse_log_text(text), "ref", cr.parse_log(ref), iterations=(1, 6))
    assert "run lacks iterations 3-4 (not in the log) and 6 (log ends at iteration 5)" in c.result


def test_repeated_iterations_take_the_last_value_and_skipped_updates_are_named(tmp_path):
    text = "\n".join([line(1, 9.0), line(2, 9.5), " > relaunch", line(2, 8.9), line(3, 8.8)])
    p = cr.parse_log_text(text)
    assert p.values[2] == 8.9 and p.repeated == [2]
    no_loss = line(2, 1.0).replace("lm loss: 1.000000E+00 | z loss: 8.210738E+01 | ", "")
    p = cr.parse_log_text("\n".join([line(1, 9.0), no_loss, line(3, 8.8)]))
    assert p.values == {1: 9.0, 3: 8.8} and p.without_metric == [2]
    ref = cr.parse_log_text("\n".join(line(i, 9.0) for i in (1, 2, 3)))
    c = cr.compare("x", p, "ref", ref)
    assert not c.passed and "iterations 2 logged no lm loss" in c.result


def test_bad_arguments_exit_2(capsys):
    assert cr.main(["--reference", "a.log", "--iterations", "5-2", "b.log"]) == 2
    assert "--iterations '5-2'" in capsys.readouterr().err
    assert cr.main(["--reference", "a.log", "--iterations", "x", "b.log"]) == 2
    assert cr.main(["--reference", "a.log", "--rtol", "-1", "b.log"]) == 2


def test_an_unwritable_json_is_refused_before_comparing(tmp_path, capsys):
    ref = write_log(tmp_path, "ref", REF)
    target = tmp_path / "no_such_dir" / "x.json"
    rc, out = run_main(["--reference", ref, "--json", str(target), ref])
    err = capsys.readouterr().err
    assert rc == 2 and out == "" and not target.exists()
    assert err.startswith(f"compare_runs.py: error: --json {target}: ") and err.count("\n") == 1
    assert "Traceback" not in err
    rc, out = run_main(["--reference", ref, "--json", str(tmp_path), ref])
    assert rc == 2 and "is a directory" in capsys.readouterr().err


def test_helpers():
    assert cr.parse_range("11-20") == (11, 20) and cr.parse_range("7") == (7, 7)
    assert cr.format_ranges([9, 1, 2, 3, 7, 10]) == "1-3, 7, 9-10"
    assert cr.tolerance_text(1e-3, 0) == "rel 1e-03"
    assert cr._split_spec("runs/x/tp2_sp.log") == ("tp2_sp", "runs/x/tp2_sp.log")
    assert cr._split_spec("TP2 + SP, 2 GPUs=/a/b.log") == ("TP2 + SP, 2 GPUs", "/a/b.log")


def test_command_line_errors_are_one_line_without_a_traceback(tmp_path):
    import subprocess

    ref = write_log(tmp_path, "ref", REF)
    tool = os.path.join(ROOT, "tools", "compare_runs.py")
    for extra, needle in ((["--json", "/nonexistent/x.json", ref], "--json /nonexistent/x.json"),
                          ([str(tmp_path / "gone.log")], "no such file"),
                          (["--metric", "lm los", ref], "--metric 'lm los'")):
        p = subprocess.run([sys.executable, tool, "--reference", ref] + extra,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and p.stdout == "", (extra, p.stdout, p.stderr)
        assert p.stderr.count("\n") == 1 and needle in p.stderr and "Traceback" not in p.stderr
