"""The GPU check drivers without a GPU: ``tools/gpu_check.py``'s subcommands, each one's
``--dry-run`` (the commands of its run matrix, nothing written), the tables they build from
synthetic trainer / benchmark logs, and the shared launcher (logs, time limit, process group)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from megatron_hybrid.gpu_checks import benchmark, cli, gdn, long_context, multi_gpu_report, training, tuner
from megatron_hybrid.gpu_checks.runner import ROOT, TIMED_OUT, Launcher, markdown_table, pack_logs

LINE = (" [2026-12-08 00:00:00] iteration {it:8d}/     200 | consumed samples: {it} | elapsed time "
        "per iteration (ms): {ms} | throughput per GPU (TFLOP/s/GPU): 300.1 | tokens per second per "
        "GPU: {tps} | MFU: {mfu}% | learning rate: 6.000000E-04 | global batch size:     4 | "
        "lm loss: {loss} | loss scale: 1.0 | grad norm: 1.234 | mem-max-allocated-gib: {mem} | "
        "number of skipped iterations:   0 | number of nan iterations:   0 |")


def _out(fn, *args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = fn(*args)
    return rc, buf.getvalue()


def test_entry_point_lists_the_checks_and_refuses_unknown_ones():
    env = {**os.environ, "PYTHONPATH": ROOT}  # this checkout's package, wherever it is installed from
    r = subprocess.run([sys.executable, "tools/gpu_check.py", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0
    for name in ("gdn", "training", "features", "benchmark", "long-context", "tuner", "multi-gpu"):
        assert f"  {name} " in r.stdout
    assert cli.main(["nope"]) == 2


@pytest.mark.parametrize("check, argv, expect", [
    (gdn, [], ["layer  kernel_backend=fla", "mixer  kernel_backend=torch"]),
    (training, ["--iters", "10"], ["build_embedded_corpus.py", "--exit-interval 5",
                                   "TRAIN_ITERS=10 bash examples/train_olmo_hybrid_1b.sh"]),
    (benchmark, ["--max-minutes", "2", "--engines", "ours"],
     ["tools/benchmark.py --max-minutes 2 --profile", "--engines ours"]),
    (long_context, ["--seq-lengths", "1024", "2048", "--extra=--intra-document-masking"],
     ["--seq-length 1024", "--seq-length 2048 --max-position-embeddings 2048",
      "--num-workers 0 --intra-document-masking"]),
    (tuner, ["--plans", "2:4096:selective:8192"], ["--micro-batch-size 2 --recompute-granularity "
                                                   "selective", "--measure-iters 6"]),
])
def test_dry_runs_print_the_run_matrix_and_write_nothing(check, argv, expect, tmp_path):
    out = tmp_path / "out"
    rc, text = _out(check.main, ["--dry-run", "--out", str(out), *argv])
    assert rc == 0 and not out.exists(), text
    for piece in expect:
        assert piece in text, (piece, text)


def test_environment_values_are_the_flags_fallbacks(monkeypatch, tmp_path):
    monkeypatch.setenv("SEQ_LENGTHS", "512 768")
    monkeypatch.setenv("ITERS", "7")
    _, text = _out(long_context.main, ["--dry-run"])
    assert "--seq-length 512 " in text and "--seq-length 768 " in text and "--train-iters 7 " in text
    _, text = _out(long_context.main, ["--dry-run", "--iters", "3"])  # a flag beats the variable
    assert "--train-iters 3 " in text
    monkeypatch.setenv("PLANS", "1:4096:sometimes:8192")
    with pytest.raises(SystemExit):
        tuner.parse_args([])


def test_long_context_row_from_a_log():
    text = "\n".join(LINE.format(it=i, ms=ms, tps=1, mfu=1, loss="9.0E+00", mem=mem)
                     for i, (ms, mem) in enumerate([(9000.0, 40.0), (2000.0, 41.5), (3000.0, 41.0)], 1))
    row = long_context.summarise(text, 32768)
    # step: median of 2.0 and 3.0 s (the first, autotuning, left out); tokens/s = 32768 / 2.5
    assert row == [32768, "41.5", "2.50", f"{32768 / 2.5:,.0f}"]
    assert long_context.summarise("crashed", 65536) == [65536, "-", "-", "- (see seq65536.log)"]


def test_training_table_from_two_logs():
    def lines(its, loss0):
        return "\n".join(LINE.format(it=i, ms=1, tps=1000.0 * i, mfu=float(i), loss=f"{loss0 - i / 100:.4E}",
                                     mem=20 + i / 100) for i in its)
    texts = {"part1": lines([5, 10, 25], 9.0), "part2": " > loaded checkpoint from /r at iteration 30\n"
             + lines([35, 40], 9.0)}
    table = training.summarise(texts, half=30, log_interval=5).splitlines()
    # steady: after 20, not 35 (the first interval after the reload) -> 25 and 40
    assert table[2] == "| iterations logged | 5..40 (5 lines) |"
    assert table[3] == f"| lm loss first -> last | {9.0 - 0.05:.3f} -> {9.0 - 0.40:.3f} |"
    assert table[4] == f"| tokens/s/GPU (median, steady) | {(25000 + 40000) / 2:,.0f} |"
    assert table[5] == f"| MFU (median, 989.4 TFLOP/s peak) | {(25 + 40) / 2:.2f}% |"
    assert table[6] == "| peak memory allocated (GiB) | 20.4 |"
    assert table[7] == "| checkpoint at 30 reloaded by the relaunch | True |"
    with pytest.raises(ValueError):
        training.summarise({"part1": "", "part2": ""}, 30, 5)


def test_benchmark_autotune_summary_and_engine_table():
    log = ("Triton autotuning for function chunk_fwd,\nwith key as (1, 2),\nfinished after 2.50s,\n"
           "best config selected: x\nTriton autotuning for function chunk_fwd,\nwith key as (3,),\n"
           "finished after 1.00s,\nTriton autotuning for function l2norm,\nwith key as (4,),\n"
           "finished after 0.25s,\n")
    lines = benchmark.autotune_summary(log).splitlines()
    assert lines[0].startswith("autotune sessions in this run: 3, 3.8 s")
    assert lines[1].split() == ["chunk_fwd", "2", "keys", "3.5", "s"]
    assert lines[2].split() == ["l2norm", "1", "keys", "0.2", "s"]
    md = "# title\n\n| | ours | hf |\n|---|---|---|\n| tokens/s | 1 | 2 |\n\ntext\n| x |\n"
    assert benchmark.engine_table(md) == "| | ours | hf |\n|---|---|---|\n| tokens/s | 1 | 2 |"


def test_gdn_table_and_tuner_plans():
    res = {"seq_length": 8192, "micro_batch_size": 1, "gpu": "G", "torch": "2.x", "triton": "3.x"}
    for part, (f, t) in {"layer": (4.0, 10.0), "mixer": (2.0, 8.0)}.items():
        res.update({f"{part}_fla_ms": f, f"{part}_torch_ms": t, f"{part}_speedup_fla_vs_torch": t / f,
                    f"{part}_out_rel_diff": 1e-3, f"{part}_dx_rel_diff": 2e-3})
    lines = gdn.format_table(res).splitlines()
    assert lines[-2] == "| mixer | 2.00 | 8.00 | 4.00 | 1.00e-03 | 2.00e-03 |"
    assert lines[-1] == "| layer | 4.00 | 10.00 | 2.50 | 1.00e-03 | 2.00e-03 |"
    plan = tuner.parse_plan("4:4096:none:8192")
    assert (plan.micro_batch, plan.seq_length, plan.recompute, plan.vocab) == (4, 4096, "none", 8192)
    assert plan.name == "mbs4_seq4096_none_vocab8192"
    args = tuner.parse_args(["--plans", "1:8192:full:100278"])
    flags = tuner.tuner_args(args.plans[0], args, "/o")
    assert flags[flags.index("--measure-dir") + 1] == "/o/logs/mbs1_seq8192_full_vocab100278"


def test_scaling_table_from_records(tmp_path):
    def rec(m, n, measured, mem):
        with open(tmp_path / f"{m}_{n}gpu.jsonl", "w") as f:
            f.write(json.dumps({"plan": f"TP1 DP{n}", "tokens_per_s_per_gpu": 1100.0,
                                "measured_tokens_per_s": measured, "last_stage_peak_gib": 10.0,
                                "measured_mem_gib": mem}) + "\n")
    rec("1b", 1, 1000.0, 8.0)
    rec("1b", 2, 900.0, 8.0)
    jobs = [multi_gpu_report.ScalingJob("1b", 2, "exit 0", "40", 2),
            multi_gpu_report.ScalingJob("1b", 1, "exit 0", "41", 1),
            multi_gpu_report.ScalingJob("1b", 4, "skipped: needs 4 GPUs", "-", 0)]
    lines = multi_gpu_report.scaling_table(jobs, str(tmp_path), 8).splitlines()
    name = "olmo_hybrid_1b, seq 4096, vocab 100278"
    assert lines[4] == f"| {name} | 1 | TP1 DP1 | 1,100 | 1,000 | +10.0% | 1.00x | 10.0 | 8.0 | +25.0% |"
    assert lines[5] == (f"| {name} | 2 | TP1 DP2 | 1,100 | 900* | {100 * 200 / 900:+.1f}% | 0.90x | 10.0 | "
                        f"8.0 | +25.0% |")
    assert lines[6] == f"| {name} | 4 | - | - | skipped: needs 4 GPUs | - | - | - | - | - |"
    assert lines[-1].startswith("\\* measured while other runs")


def test_correctness_rows_name_a_missing_log(tmp_path):
    ok_line = LINE.format(it=1, ms=1, tps=1, mfu=1, loss="9.000000E+00", mem=1)
    (tmp_path / "ref.log").write_text(ok_line + "\n")
    (tmp_path / "a.log").write_text(ok_line + "\n")
    rows, ok = multi_gpu_report.compare_rows("ref", str(tmp_path / "ref.log"), "1-1",
                                             [("a: X", str(tmp_path / "a.log")),
                                              ("b: Y", str(tmp_path / "b.log"))], "1e-3", "0")
    assert not ok and len(rows) == 2
    assert rows[0].startswith("| b: Y | ref | 1-1 | - | - | - | FAIL: the run left no log")
    assert rows[1].startswith("| a: X | ref |") and "PASS" in rows[1].upper()
    assert multi_gpu_report.last_loss(str(tmp_path / "a.log")) == "lm loss 9.0000 (it 1) -> 9.0000 (it 1)"


def test_launcher_logs_echoes_and_stops_a_launch_at_its_limit(tmp_path, capsys):
    log = tmp_path / "run.log"
    rc = Launcher().run([sys.executable, "-c", "print('keep'); print('drop')"], str(log),
                        echo=lambda ln: "keep" in ln, header="# header")
    assert rc == 0 and log.read_text() == "# header\nkeep\ndrop\n"
    assert capsys.readouterr().out == "keep\n"
    t0 = time.time()
    child = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
              f"'import time; time.sleep(60)']); open({str(child)!r}, 'w').write(str(p.pid)); "
              f"time.sleep(60)")
    rc = Launcher(kill_after_s=5).run([sys.executable, "-c", script], str(tmp_path / "t.log"), timeout_s=2)
    assert rc == TIMED_OUT and time.time() - t0 < 30
    stat = f"/proc/{int(child.read_text())}/stat"
    time.sleep(0.5)
    # the launch's own child ended with it (its process group): gone, or a zombie left to reap
    assert not os.path.exists(stat) or open(stat).read().rsplit(")", 1)[1].split()[0] == "Z"


def test_markdown_table_and_pack_logs(tmp_path):
    assert markdown_table(("a", "b"), [(1, "x")]) == "| a | b |\n|---|---|\n| 1 | x |"
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "01.log").write_text("hi")
    path = pack_logs(str(tmp_path), "logs", "feature_logs.tar.gz")
    assert not (tmp_path / "logs").exists()
    with tarfile.open(path) as tar:
        assert tar.getnames() == ["logs", "logs/01.log"]
