"""The GPU feature check's driver (megatron_hybrid/gpu_checks/features.py) on CPU: its rows run
every flag of the trainer, trainer logs are parsed into the table's figures, and a row is judged
by exit status, iteration lines and its expected lines."""
from __future__ import annotations

from megatron_hybrid.gpu_checks import features as fc

LINE = (" [2026-12-08 00:00:00] iteration {it:8d}/      30 | consumed samples:          {it} | "
        "elapsed time per iteration (ms): 91.2 | throughput per GPU (TFLOP/s/GPU): 300.1 | "
        "tokens per second per GPU: {tps} | MFU: 30.33% | learning rate: 6.000000E-04 | "
        "global batch size:     2 |{loss} loss scale: 1.0 | grad norm: 1.234 | "
        "mem-max-allocated-gib: {mem} | number of skipped iterations: {skipped:3d} | "
        "number of nan iterations:   0 |")


def _log():
    return "\n".join([
        " > fla kernel warm-up: 8 processes compiled fla's autotune candidates in 61.5 s",
        LINE.format(it=5, tps="1000.0", loss=" lm loss: 9.500000E+00 | z loss: 8.0E+01 |",
                    mem="20.50", skipped=0),
        " > iteration 7: update skipped: non-finite loss",
        LINE.format(it=10, tps="4000.0", loss=" lm loss: 8.250000E+00 |", mem="21.75", skipped=1),
        LINE.format(it=15, tps="5000.0", loss="", mem="21.00", skipped=5),
        LINE.format(it=20, tps="4500.0", loss=" lm loss: 7.125000E+00 |", mem="19.00", skipped=0),
        " > saved checkpoint at iteration 20 to /w/ckpt",
    ])


def test_parse_log_reads_losses_speed_memory_and_notes():
    facts = fc.parse_log(_log())
    assert facts["losses"] == [(5, 9.5), (10, 8.25), (20, 7.125)]  # 15: every step skipped
    assert facts["tokens_per_s"] == 4500.0  # median of 4000, 5000, 4500 (the first interval out)
    assert facts["peak_gib"] == 21.75 and facts["skipped"] == 6
    assert facts["notes"] == ["warm-up 61.5 s", "saved at 20", "6 skipped"]


def test_judge_names_what_is_missing():
    row = fc.Row("save", [], expect=(r"saved checkpoint at iteration 20\b",))
    text = _log()
    facts = fc.parse_log(text)
    assert fc.judge(row, 0, text, facts, "/w") == "yes"
    late = fc.Row("save", [], expect=(r"saved checkpoint at iteration 30\b",))
    assert fc.judge(late, 0, text, facts, "/w").startswith("no (log lacks /saved checkpoint")
    crash = text + "\nTraceback (most recent call last):\nTypeError: varlen_attn() got an unexpected keyword"
    assert fc.judge(row, 1, crash, facts, "/w") == \
        "no (exit 1: TypeError: varlen_attn() got an unexpected keyword)"
    assert fc.judge(row, None, text, facts, "/w") == "no (time limit; killed)"
    assert fc.judge(row, 0, "no iterations", fc.parse_log("no iterations"), "/w").startswith("no (no iteration")
    assert fc.judge(fc.Row("tb", [], files=("/nonexistent/events.*",)), 0, text, facts, "/w") == \
        "no (no file /nonexistent/events.*)"


def test_resume_is_compared_with_the_uninterrupted_run_at_the_same_iteration():
    base = {"ran": "yes", "facts": {"losses": [(20, 7.0), (30, 6.5)], "notes": []}}
    ok = {"ran": "yes", "facts": {"losses": [(20, 7.0), (30, 6.51)], "notes": []}}
    bad = {"ran": "yes", "facts": {"losses": [(20, 7.0), (30, 6.7)], "notes": []}}
    results = {"b": base, "ok": ok, "bad": bad, "not run": {"ran": "no (needs the row 'save')"}}
    fc.compare_resume(results, "b", "not run", 0.05)  # a row that never launched has no facts
    fc.compare_resume(results, "not run", "ok", 0.05)
    assert ok["facts"]["notes"] == [] and results["not run"]["ran"].startswith("no (needs")
    fc.compare_resume(results, "b", "ok", 0.05)
    fc.compare_resume(results, "b", "bad", 0.05)
    assert ok["ran"] == "yes" and ok["facts"]["notes"] == ["loss at 30 vs baseline +1.0e-02"]
    assert bad["ran"].startswith("no (loss at 30 differs from the uninterrupted baseline by +2.00e-01")


def test_the_gpu_rows_run_every_flag_of_the_trainer():
    rows = fc.feature_rows(fc.GPU, "/w", "/w/data/corpus_text_document")
    corpus = fc.Corpus("/w/data", "/w").flags
    argvs = [fc.common_flags(fc.GPU, "/w") + (corpus if r.data else []) + r.flags for r in rows]
    assert fc.uncovered_flags(argvs) == []
    assert fc.uncovered_flags(argvs[:1])  # one row alone does not
    assert len({r.name for r in rows}) == len(rows)
    assert all(r.needs in {x.name for x in rows[:i]} for i, r in enumerate(rows) if r.needs)
    assert {"--model-preset", "olmo_hybrid_1b"} <= set(argvs[0]) and "2048" in argvs[0]


def test_the_table_has_one_row_per_feature_with_the_parsed_figures():
    facts = fc.parse_log(_log())
    table = fc.format_table({"a": {"ran": "yes", "facts": facts, "wall_s": 41.6},
                             "b": {"ran": "no (time budget: not started)"}})
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[2] == ("| a | yes | 9.500 -> 7.125 (5..20) | 4,500 | 21.8 | 42 | "
                        "warm-up 61.5 s; saved at 20; 6 skipped |")
    assert lines[3] == "| b | no (time budget: not started) | - | - | - | - | - |"
