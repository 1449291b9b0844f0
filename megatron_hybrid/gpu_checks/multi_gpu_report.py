"""The multi-GPU check's two tables: correctness (losses vs the one-GPU run) and scaling.

Correctness rows come from ``tools/compare_runs.py`` (``megatron_hybrid/training/compare_runs.py``,
one row per compared run) plus rows for runs that were skipped or left no log. Scaling rows come from
the records ``tools/tune_parallelism.py --measure`` appends to ``SCALING/<model>_<n>gpu.jsonl``:
predicted and measured tokens/s/GPU and peak memory (GiB) of the top plan per GPU count, the error
(predicted - measured) / measured, and the speed-up over the model's one-GPU run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os

CORRECTNESS_HEADER = ("| run | reference | iterations | max abs diff (iteration) | max rel diff | "
                      "tolerance | result |\n|---|---|---|---|---|---|---|")
SCALING_NAMES = {"1b": "olmo_hybrid_1b, seq 4096, vocab 100278",
                 "7b8l": "7B widths x 8 layers, seq 8192, vocab 100278", "tiny": "tiny, seq 256"}


def skipped_row(label: str, reference: str, reason: str) -> str:
    """A correctness row for a run that was not compared."""
    return f"| {label} | {reference} | - | - | - | - | {reason} |"


def compare_rows(reference: str, ref_log: str, iterations: str, specs: list[tuple[str, str]],
                 rtol: str, atol: str) -> tuple[list[str], bool]:
    """Rows of tools/compare_runs.py for ``specs`` ((label, log path)) against ``reference``'s log
    over ``iterations`` ("FIRST-LAST"), with a FAIL row for a run or reference that left no log.
    Returns (rows, every run passed)."""
    from megatron_hybrid.training import compare_runs

    rows, ok, present = [], True, []
    for label, path in specs:
        if not os.path.isfile(ref_log):
            rows.append(f"| {label} | {reference} | {iterations} | - | - | - | FAIL: not compared: "
                        f"the {reference} run left no log |")
            ok = False
        elif not os.path.isfile(path):
            rows.append(f"| {label} | {reference} | {iterations} | - | - | - | FAIL: the run left no "
                        f"log ({path}) |")
            ok = False
        else:
            present.append(f"{label}={path}")
    if present:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = compare_runs.main(["--no-header", "--reference", f"{reference}={ref_log}",
                                    "--iterations", iterations, "--rtol", rtol, "--atol", atol,
                                    *present])
        rows += [ln for ln in buf.getvalue().splitlines() if ln.strip()]
        ok = ok and rc == 0
    return rows, ok


def last_loss(path: str) -> str:
    """'lm loss FIRST (it 1) -> LAST (it N)' of a training log, or why there is none."""
    from megatron_hybrid.training.compare_runs import parse_log

    if not os.path.isfile(path):
        return f"no log ({os.path.basename(path)})"
    p = parse_log(path)
    its = sorted(p.values)
    if its:
        return (f"lm loss {p.values[its[0]]:.4f} (it {its[0]}) -> {p.values[its[-1]]:.4f} "
                f"(it {its[-1]})")
    return ("no iteration lines" + (" (timed out)" if p.timed_out else "")
            + (f"; {p.first_error[:200]}" if p.first_error else ""))


def correctness_table(title: str, rows: list[str]) -> str:
    """The correctness section: its title line, the header, the rows."""
    return f"### {title}\n\n{CORRECTNESS_HEADER}\n" + "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class ScalingJob:
    """One scaling case's outcome: model key, GPU count, status ('exit 0', 'skipped: ...'),
    seconds ('-' when not run) and how many runs shared its wave."""

    model: str
    gpus: int
    status: str
    seconds: str
    peers: int


def _record(out: str, model: str, n: int) -> dict | None:
    path = os.path.join(out, f"{model}_{n}gpu.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return recs[-1] if recs else None


def _err(predicted, measured) -> str:
    return "-" if predicted is None or not measured else f"{100 * (predicted - measured) / measured:+.1f}%"


def scaling_table(jobs: list[ScalingJob], out: str, iters: int) -> str:
    """The scaling section (title, table, the footnote for shared waves) from ``out``'s records."""
    lines = ["### Scaling: the top plan of tools/tune_parallelism.py per GPU count, bf16, mock data "
             f"({iters} iterations; measured: median tokens/s/GPU after the first third, peak "
             "memory allocated of the last rank)", "",
             "| model | GPUs | plan | tokens/s/GPU predicted | measured | error | vs 1 GPU "
             "| peak GiB predicted | measured | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    base, shared = {}, False
    for j in sorted(jobs, key=lambda j: (j.model, j.gpus)):
        name, r = SCALING_NAMES.get(j.model, j.model), _record(out, j.model, j.gpus)
        if r is None or r.get("measured_tokens_per_s") is None:
            secs = f", {j.seconds} s" if j.seconds != "-" else ""
            why = j.status if j.status.startswith("skipped") else (
                f"no measurement ({j.status}{secs}; see scaling/{j.model}_{j.gpus}gpu.log)")
            lines.append(f"| {name} | {j.gpus} | {r['plan'] if r else '-'} | - | {why} | - | - | - | - | - |")
            continue
        pt, mt = r["tokens_per_s_per_gpu"], r["measured_tokens_per_s"]
        pm, mm = r["last_stage_peak_gib"], r["measured_mem_gib"]
        if j.gpus == 1:
            base[j.model] = mt
        eff = (f"{mt / base[j.model]:.2f}x" if j.model in base and j.gpus > 1
               else ("1.00x" if j.gpus == 1 else "-"))
        rss = " (CPU RSS)" if r.get("measured_mem_kind") == "peak-rss-gib" else ""
        star = "*" if j.peers > 1 else ""
        shared = shared or j.peers > 1
        lines.append(f"| {name} | {j.gpus} | {r['plan']} | {pt:,.0f} | {mt:,.0f}{star} | {_err(pt, mt)} | "
                     f"{eff} | {pm:.1f} | {'-' if mm is None else f'{mm:.1f}'}{rss} | {_err(pm, mm)} |")
    if shared:
        lines += ["", "\\* measured while other runs of its round used the other GPUs of the machine "
                  "(--scaling-serial: one run at a time)."]
    return "\n".join(lines)
