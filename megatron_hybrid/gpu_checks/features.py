"""One GPU check of every training feature: a short run per feature, one table row each.

    python tools/gpu_check.py features --out /tmp/out [--rows 2,7,8] [--budget-s 510] [--pack-logs]
    python tools/gpu_check.py features --cpu --out /tmp/out     # CPU smoke: tiny preset

Rows: mock data, the embedded corpus (built into ``WORK/data`` with tools/build_embedded_corpus.py,
beside the first row; log ``OUT/logs/00_corpus.log``), intra-document masking,
``--reset-attention-mask --reset-position-ids``, selective and full recompute, z-loss, skip-step
with an injected NaN, save + reload, finetune, resume overrides stopped by SIGUSR1, model-shape
flags, a data blend, ``--exit-duration-in-mins``, ``--dry-run``. Each row launches the trainer
(``torchrun``, one process, from the repository root) with the ``olmo_hybrid_1b`` preset at
sequence 2048, micro-batch 2, for a few dozen iterations, plus that row's flags; its output goes
to ``OUT/logs/<row>.log`` (``--pack-logs``: one ``OUT/feature_logs.tar.gz`` instead). ``--work``
[$TMPDIR/gpu_check_features] holds the data, checkpoints (about 17 GB on the GPU) and TensorBoard.
A row ran when the
launch exits 0, logs iteration lines and every line the row expects (``update skipped``,
``loaded checkpoint ...``). The table (feature, ran, lm loss first -> last, tokens/s/GPU, peak
memory, wall time) is printed last and written to ``OUT/features.md``, with the flags of each
row and the trainer's flags that no row ran (``uncovered_flags``: none is the goal).

``--cpu`` runs the same rows with the ``tiny`` preset, sequence 64 and a few iterations on gloo:
a smoke test of the rows, the log parsing and the table (not of speed).

Units: tokens/s per GPU (median of the logged intervals after the first, which holds compile and
autotune time), peak memory in GiB (``torch.cuda.max_memory_allocated``; peak RSS on CPU), wall
time of the launch in seconds. Rows that would start after ``--budget-s`` [510] seconds from the
start are reported as not run. A warm H100 row takes 36-46 s (about 30 s of it start-up), the
first row and the first masked one about two minutes on a cold kernel cache (fla's warm-up): all 15
rows need about 11 minutes, so split them over calls with ``--rows``. On Hopper with Triton < 3.7.1
it opts in to the fla gradient self-check (MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=1). Environment
fallbacks: OUT, WORK, BUDGET_S, ROWS, CPU (non-empty: ``--cpu``), PACK_LOGS (1: ``--pack-logs``).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from megatron_hybrid.config import PRESETS
from megatron_hybrid.gpu_checks.runner import (
    ROOT,
    Launcher,
    default_out,
    env,
    hopper_selfcheck_env,
    markdown_table,
    number,
    pack_logs,
    python,
    shown,
)


@dataclasses.dataclass(frozen=True)
class Mode:
    """Run sizes: GPU (the 1B preset) or the CPU smoke (the tiny preset)."""

    preset: str
    seq: int
    iters: int        # iterations of a full row
    short: int        # iterations of the other rows
    half: int         # the save row's checkpoint / exit iteration
    log: int          # --log-interval
    warmup: int       # --lr-warmup-iters
    nan_at: int       # iteration whose loss is made NaN (skip-step row)
    backend: str
    exit_minutes: float
    resume_tol: float  # |lm loss| resumed vs uninterrupted at the last logged iteration
    timeout_s: float


GPU = Mode("olmo_hybrid_1b", 2048, 30, 20, 15, 5, 5, 12, "nccl", 0.1, 0.05, 240)
CPU = Mode("tiny", 64, 4, 3, 2, 1, 1, 3, "gloo", 0.02, 1e-4, 240)
MICRO_BATCH = 2


@dataclasses.dataclass
class Row:
    """One launch. ``flags`` come after the common ones (argparse: the last value wins)."""

    name: str
    flags: list[str]
    expect: tuple[str, ...] = ()   # regexes the log must hold
    data: bool = True              # add the embedded corpus' --data-path / tokenizer flags
    env: dict = dataclasses.field(default_factory=dict)
    needs: str | None = None       # a row that must have run first (its checkpoint)
    signal_at: int | None = None   # SIGUSR1 to the trainer once this iteration is logged
    files: tuple[str, ...] = ()    # globs that must match afterwards
    cleanup: tuple[str, ...] = ()  # directories removed afterwards (checkpoints: disk)
    launcher: str = "torchrun"     # or "python" (no process group: --dry-run)
    iterations: bool = True        # iteration lines expected
    timeout_s: float | None = None
    min_s: float = 45              # not started with less budget left (a warm H100 row: 36-46 s)


def common_flags(m: Mode, work: str) -> list[str]:
    """Flags every row starts from."""
    return ["--model-preset", m.preset, "--seq-length", str(m.seq),
            "--micro-batch-size", str(MICRO_BATCH), "--global-batch-size", str(MICRO_BATCH),
            "--train-iters", str(m.short), "--bf16", "--lr", "6e-4", "--min-lr", "6e-5",
            "--lr-warmup-iters", str(m.warmup), "--log-interval", str(m.log), "--eval-iters", "0",
            "--num-workers", "1", "--split", "98,2,0", "--data-cache-path", f"{work}/data_cache",
            "--distributed-timeout-minutes", "5", "--seed", "1234"]


def _baseline(m: Mode, work: str) -> list[str]:
    """The uninterrupted reference (the save and resume rows repeat it)."""
    return ["--train-iters", str(m.iters), "--use-distributed-optimizer", "--overlap-grad-reduce",
            "--overlap-param-gather", "--ddp-bucket-size", "40000000", "--z-loss-weight", "1e-5",
            "--skip-step", "--clip-grad", "1.0", "--weight-decay", "0.1",
            "--weight-decay-grouping", "olmo", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
            "--adam-eps", "1e-8", "--lr-decay-style", "cosine"]


def training_rows(m: Mode, work: str) -> list[Row]:
    """Data, attention masking, recompute, loss and skip-step rows."""
    p = PRESETS[m.preset]
    return [
        Row("mock data", ["--mock-data", "--vocab-size", str(p["vocab_size"]), "--num-workers", "0",
                          "--fla-warmup-workers", "8", "--lr-warmup-iters", "0",
                          "--lr-warmup-fraction", "0.1", "--lr-warmup-init", "1e-6",
                          "--lr-decay-style", "linear", "--lr-decay-iters", str(2 * m.short),
                          "--weight-decay-grouping", "megatron", "--clip-grad", "0",
                          "--wandb-project", "feature-check", "--wandb-exp-name", "mock",
                          "--wandb-save-dir", f"{work}/wandb"],
            data=False, env={"WANDB_MODE": "offline"}, timeout_s=360, min_s=140),  # cold warm-up
        Row("embedded corpus (baseline)", _baseline(m, work) + [
            "--tensorboard-dir", f"{work}/tensorboard", "--peak-tflops", "989.4",
            "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
            "--context-parallel-size", "1", "--sequence-parallel",
            "--distributed-backend", m.backend],
            expect=(r"z loss: ",), files=(f"{work}/tensorboard/events.out.tfevents.*",)),
        Row("intra-document masking", ["--train-iters", str(m.iters), "--intra-document-masking"]),
        Row("selective recompute", ["--train-iters", str(m.iters),
                                    "--recompute-granularity", "selective"]),
        Row("full recompute", ["--train-iters", str(m.iters), "--recompute-granularity", "full",
                               "--recompute-method", "uniform", "--recompute-num-layers", "1"]),
        Row("skip-step + NaN fault", ["--skip-step", "--skip-step-sigma", "6",
                                      "--skip-step-window", "16", "--skip-step-min-history", "4",
                                      "--max-consecutive-skipped-steps", "5"],
            env={"MEGATRON_HYBRID_INJECT_FAULT": f"nan-loss@{m.nan_at}"},
            expect=(rf"iteration {m.nan_at}: update skipped",)),
    ]


def checkpoint_rows(m: Mode, work: str) -> list[Row]:
    """Save, resume, finetune, and a resume that overrides what it can (stopped by SIGUSR1)."""
    ckpt = f"{work}/ckpt"
    return [
        Row("save + exit-interval + eval", _baseline(m, work) + [
            "--save", ckpt, "--save-interval", str(m.half), "--exit-interval", str(m.half),
            "--dist-ckpt-optim-fully-reshardable", "--eval-interval", str(m.half),
            "--eval-iters", "2"],
            expect=(rf"saved checkpoint at iteration {m.half}\b", rf"exiting at iteration {m.half}\b",
                    rf"validation loss at iteration {m.half}\b"), min_s=100),  # H100: 91 s
        Row("resume (reload)", _baseline(m, work) + ["--load", ckpt,
                                                     "--use-checkpoint-opt-param-scheduler"],
            needs="save + exit-interval + eval",
            expect=(rf"loaded checkpoint from \S+ at iteration {m.half}\b",)),
        Row("finetune (model-only load)", ["--load", ckpt, "--finetune", "--save", f"{work}/ckpt_ft",
                                           "--no-save-optim"],
            needs="save + exit-interval + eval", cleanup=(f"{work}/ckpt_ft",),
            expect=(rf"finetune: loaded model weights of iteration {m.half}\b",
                    rf"saved checkpoint at iteration {m.short}\b")),
        Row("resume overrides + SIGUSR1 stop", [
            "--use-distributed-optimizer", "--load", ckpt, "--save", f"{work}/ckpt_dp",
            "--no-dist-ckpt-optim-fully-reshardable", "--no-load-optim", "--no-load-rng",
            "--override-opt-param-scheduler", "--override-data-check", "--lr", "3e-4",
            "--split", "97,3,0", "--train-iters", str(10 * m.iters)],
            needs="save + exit-interval + eval", signal_at=m.half + m.log,
            cleanup=(f"{work}/ckpt_dp",),
            expect=(rf"loaded checkpoint from \S+ at iteration {m.half}\b", r"--override-data-check",
                    r"received SIGUSR1", r"stopping at iteration \d+ \(SIGTERM/SIGUSR1\)",
                    r"saved checkpoint at iteration")),
    ]


def flag_rows(m: Mode, work: str, corpus_prefix: str) -> list[Row]:
    """Model-shape flags, a data blend, the wall-clock stop and the dry run."""
    p = PRESETS[m.preset]
    shape = ["--hidden-size", str(p["hidden_size"]), "--ffn-hidden-size", str(p["ffn_hidden_size"] // 2),
             "--num-attention-heads", str(p["num_attention_heads"]), "--kv-channels", str(p["kv_channels"]),
             "--linear-num-key-heads", str(p["linear_num_key_heads"]),
             "--linear-num-value-heads", str(p["linear_num_value_heads"]),
             "--linear-key-head-dim", str(p["linear_key_head_dim"]),
             "--linear-value-head-dim", str(p["linear_value_head_dim"]), "--linear-conv-kernel-dim", "4"]
    return [
        Row("reset-attention-mask + reset-position-ids, shape flags (4 layers)", shape + [
            "--num-layers", "4", "--hybrid-layer-pattern", "G-*-G-*-", "--position-embedding-type",
            "none", "--tie-embeddings-and-output-weights", "--linear-allow-neg-eigval",
            "--reset-attention-mask", "--reset-position-ids"]),
        Row("GQA + masking, CPU init, block recompute (8 layers)", [
            "--num-layers", "8", "--linear-attention-freq", "4", "--group-query-attention",
            "--num-query-groups", str(max(1, p["num_attention_heads"] // 4)),
            "--untie-embeddings-and-output-weights", "--rotary-base", "50000", "--norm-epsilon", "1e-5",
            "--init-method-std", "0.01", "--max-position-embeddings", str(max(4096, m.seq)),
            "--make-vocab-size-divisible-by", "256", "--no-linear-allow-neg-eigval",
            "--intra-document-masking", "--use-cpu-initialization", "--recompute-granularity", "full",
            "--recompute-method", "block", "--recompute-num-layers", "2"]),
        Row("data blend + 2 micro-batches + eval", [
            "--data-path", "0.7", corpus_prefix, "0.3", f"{work}/blend_b_text_document",
            "--global-batch-size", str(2 * MICRO_BATCH), "--eod-token", "{eod}", "--num-workers", "2",
            "--lr-decay-style", "constant", "--eval-interval", str(m.short // 2), "--eval-iters", "2"],
            expect=(r"micro-batch \d+ x 2 micro-batches", r"validation loss at iteration")),
        Row("exit-duration stop, no z-loss, no skip-step", [
            "--exit-duration-in-mins", str(m.exit_minutes), "--train-iters", str(100 * m.iters),
            "--z-loss-weight", "0", "--no-skip-step"],
            expect=(r"stopping at iteration \d+ \(--exit-duration-in-mins\)",)),
        Row("dry run", ["--dry-run", "--hybrid-override-pattern", p["hybrid_layer_pattern"]],
            launcher="python", iterations=False, expect=(r"dry run OK",), timeout_s=120),
    ]


def feature_rows(m: Mode, work: str, corpus_prefix: str) -> list[Row]:
    """Every row, in the order they run (most needed first: a time budget cuts the tail)."""
    t, c, f = training_rows(m, work), checkpoint_rows(m, work), flag_rows(m, work, corpus_prefix)
    return t + c[:2] + f[:3] + [f[3], c[2], c[3], f[4]]


# ----------------------------------------------------------------------------- logs and table

ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?tokens per second per GPU: ([\d.]+) \|")
LOSS = re.compile(r"\| lm loss: (\S+) \|")
MEMORY = re.compile(r"(?:mem-max-allocated-gib|peak-rss-gib): ([\d.]+)")


def parse_log(text: str) -> dict:
    """Facts of one trainer log.

    Returns: {"losses": [(iteration, lm loss)] of logged intervals (intervals where every step
    was skipped have no loss), "tokens_per_s": median tokens/s/GPU of the intervals after the
    first (all of them when only one), or None; "peak_gib": max memory figure, or None;
    "skipped": total skipped iterations; "notes": short facts (saves, resumes, stops, warm-up)}.
    """
    losses, rates, mems, skipped = [], [], [], 0
    for line in text.splitlines():
        m = ITERATION.search(line)
        if not m:
            continue
        rates.append(float(m.group(2)))
        loss = LOSS.search(line)
        if loss:
            losses.append((int(m.group(1)), float(loss.group(1))))
        mems += [float(x) for x in MEMORY.findall(line)]
        s = re.search(r"number of skipped iterations:\s+(\d+)", line)
        skipped += int(s.group(1)) if s else 0
    notes = []
    for pattern, fmt in ((r"fla kernel warm-up: \d+ processes compiled .*? in ([\d.]+) s", "warm-up {} s"),
                         (r"finetune: loaded model weights of iteration (\d+)", "finetune from {}"),
                         (r"loaded checkpoint from \S+ at iteration (\d+)", "resumed at {}"),
                         (r"stopping at iteration (\d+)", "stopped at {}"),
                         (r"saved checkpoint at iteration (\d+)", "saved at {}"),
                         (r"validation loss at iteration (\d+)", "eval at {}")):
        found = re.findall(pattern, text)
        if found:
            notes.append(fmt.format(",".join(dict.fromkeys(found))))
    if skipped:
        notes.append(f"{skipped} skipped")
    return {"losses": losses, "tokens_per_s": statistics.median(rates[1:] or rates) if rates else None,
            "peak_gib": max(mems) if mems else None, "skipped": skipped, "notes": notes}


def last_error(text: str) -> str:
    """The last line that names an error (for the 'ran' column), '|' made safe for markdown."""
    lines = [ln.strip() for ln in text.splitlines()
             if re.search(r"Error|error:|Traceback|Killed|CUDA out of memory", ln)]
    return (lines[-1][-150:] if lines else "no error line").replace("|", "/")


def judge(row: Row, rc: int | None, text: str, facts: dict, work: str) -> str:
    """'yes' or 'no (why)' for one launch (rc None: killed at its time limit)."""
    if rc is None:
        return "no (time limit; killed)"
    if rc != 0:
        return f"no (exit {rc}: {last_error(text)})"
    if row.iterations and not facts["losses"]:
        return "no (no iteration line with an lm loss)"
    for pattern in row.expect:
        if not re.search(pattern, text):
            return f"no (log lacks /{pattern}/)"
    for pattern in row.files:
        if not glob.glob(pattern):
            return f"no (no file {pattern.replace(work, '$WORK')})"
    if any(not math.isfinite(v) for _, v in facts["losses"]):
        return "no (non-finite logged lm loss)"
    return "yes"


def compare_resume(results: dict, baseline: str, resumed: str, tol: float) -> None:
    """Note (and judge) the resumed run's last logged loss against the uninterrupted one's."""
    a, b = results.get(baseline), results.get(resumed)
    if not a or not b or not a.get("facts") or not b.get("facts") or not b["facts"]["losses"] \
            or not b["ran"].startswith("yes"):
        return
    it, loss = b["facts"]["losses"][-1]
    ref = dict(a["facts"]["losses"]).get(it)
    if ref is None:
        return
    diff = loss - ref
    b["facts"]["notes"].append(f"loss at {it} vs baseline {diff:+.1e}")
    if abs(diff) > tol:
        b["ran"] = f"no (loss at {it} differs from the uninterrupted baseline by {diff:+.2e})"


def _cell(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(results: dict) -> str:
    """The markdown table of every row, in run order."""
    rows = []
    for name, r in results.items():
        f = r.get("facts") or {}
        ls = f.get("losses") or []
        loss = (f"{ls[0][1]:.3f} -> {ls[-1][1]:.3f} ({ls[0][0]}..{ls[-1][0]})" if ls else "-")
        rows.append([name, r["ran"], loss, _cell(f.get("tokens_per_s"), ",.0f"),
                     _cell(f.get("peak_gib"), ".1f"), _cell(r.get("wall_s"), ".0f"),
                     "; ".join(f.get("notes", [])) or "-"])
    return markdown_table(["feature", "ran", "lm loss first -> last (iterations)", "tokens/s/GPU",
                           "peak mem (GiB)", "wall (s)", "notes"], rows)


def uncovered_flags(argvs: list[list[str]]) -> list[str]:
    """The trainer's option strings (``--help`` aside) that appear in no row's argv."""
    from megatron_hybrid.config.arguments import build_parser

    used = {a for argv in argvs for a in argv if a.startswith("--")}
    options = [s for act in build_parser()._actions for s in act.option_strings
               if s.startswith("--") and s != "--help"]
    return sorted(set(options) - used)


# ----------------------------------------------------------------------------- launching

def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.split("/")[2]))
    return kids


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def launch(row: Row, argv: list[str], log_path: str, timeout_s: float, entry: str) -> tuple[int | None, float]:
    """Run one row's trainer; returns (exit status or None when killed at ``timeout_s``, wall s).

    The launch gets its own session so a timeout ends it and its workers together; a row with
    ``signal_at`` sends SIGUSR1 to the trainer processes (torchrun's children) once that
    iteration is logged.
    """
    cmd = ([sys.executable, entry] if row.launcher == "python" else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", entry])
    env = {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONUNBUFFERED": "1", **row.env}
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd + argv)}\n# env: {row.env}\n")
        log.flush()
        proc = subprocess.Popen(cmd + argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=ROOT)
        signalled = row.signal_at is None
        while proc.poll() is None:
            if time.time() - t0 > timeout_s:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return None, time.time() - t0
            if not signalled and re.search(rf"iteration\s+{row.signal_at}/", _read(log_path)):
                for pid in _children(proc.pid):
                    os.kill(pid, signal.SIGUSR1)
                signalled = True
            time.sleep(0.5)
    return proc.returncode, time.time() - t0


class Corpus:
    """The embedded corpus that :func:`build_corpus` builds beside the first row
    (``DIR/READY`` when done, ``DIR/FAILED`` when not): its flags, and once built the blend's
    second prefix (a copy) and the tokenizer's EOD id for the ``{eod}`` placeholder."""

    def __init__(self, directory: str, work: str):
        self.dir, self.work, self.eod = directory, work, None
        self.prefix = f"{directory}/corpus_text_document"
        self.flags = ["--data-path", self.prefix, "--tokenizer-type", "SentencePieceTokenizer",
                      "--tokenizer-model", f"{directory}/tokenizer.model"]

    def wait(self, limit_s: float) -> str | None:
        """None once the corpus is built (and the blend copy made), else why not."""
        t0 = time.time()
        while not os.path.exists(f"{self.dir}/READY"):
            if os.path.exists(f"{self.dir}/FAILED"):
                return "the embedded corpus build failed (logs/00_corpus.log)"
            if time.time() - t0 > limit_s:
                return "the embedded corpus build did not finish in time"
            time.sleep(1)
        if self.eod is None:
            from megatron_hybrid.data.tokenizer import build_tokenizer

            for ext in (".bin", ".idx"):
                shutil.copyfile(self.prefix + ext, f"{self.work}/blend_b_text_document{ext}")
            self.eod = int(build_tokenizer("SentencePieceTokenizer", f"{self.dir}/tokenizer.model").eod)
        return None


def _why_not_started(row: Row, results: dict, left: float, corpus: Corpus) -> str | None:
    if row.needs and not results.get(row.needs, {}).get("ran", "").startswith("yes"):
        return f"no (needs the row '{row.needs}')"
    if left < row.min_s:
        return f"no (time budget: {max(left, 0):.0f} s left, the row needs about {row.min_s:.0f} s)"
    why = corpus.wait(min(left, 300)) if row.data else None
    return why and f"no ({why})"


def run_rows(rows: list[Row], m: Mode, args) -> dict:
    """Launch each row in turn (budget and dependencies permitting); returns name -> result
    ({"ran", "facts" (parse_log), "wall_s", "argv", "log"})."""
    os.makedirs(f"{args.out}/logs", exist_ok=True)
    deadline = args.start + args.budget_s
    corpus = Corpus(args.corpus, args.work)
    results = {}
    for i, row in enumerate(rows, 1):
        argv = common_flags(m, args.work) + (corpus.flags if row.data else []) + row.flags
        left = deadline - time.time()
        why = _why_not_started(row, results, left, corpus)
        stamp = f"[{time.strftime('%H:%M:%S')}] {i}/{len(rows)} {row.name}:"
        if why:
            results[row.name] = {"ran": why, "argv": argv}
            print(f"{stamp} {why}", flush=True)
            continue
        argv = [a.replace("{eod}", str(corpus.eod)) for a in argv]
        log_path = f"{args.out}/logs/{i:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', row.name).strip('_')[:40]}.log"
        rc, wall = launch(row, argv, log_path, min(row.timeout_s or m.timeout_s, left), args.entry)
        text = _read(log_path)
        facts = parse_log(text)
        results[row.name] = {"ran": judge(row, rc, text, facts, args.work), "facts": facts,
                             "wall_s": wall, "argv": argv, "log": os.path.basename(log_path)}
        for path in row.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        print(f"{stamp} {results[row.name]['ran']} ({wall:.0f} s, {results[row.name]['log']})",
              flush=True)
    return results


def report(results: dict, rows: list[Row], m: Mode, args, missing: list[str]) -> str:
    """The markdown report: the table, each row's flags, the flags no row ran (``missing``)."""
    def shown(r: Row) -> str:
        text = " ".join(r.flags).replace(args.work, "$WORK").replace("{eod}", "<tokenizer EOD id>")
        return f"| {r.name} | `{text}`{' + env ' + str(r.env) if r.env else ''} |"

    flags = "\n".join(shown(r) for r in rows)
    return (f"# Training features on {'CPU (smoke)' if args.cpu else 'the GPU'}: {m.preset}, "
            f"sequence {m.seq}, micro-batch {MICRO_BATCH}\n\n{format_table(results)}\n\n"
            f"## Flags of each row (after the common ones)\n\n| feature | flags |\n|---|---|\n"
            f"{flags}\n\nCommon flags: `{' '.join(common_flags(m, '$WORK'))}` + the embedded corpus "
            f"(`--data-path`, `--tokenizer-type SentencePieceTokenizer`, `--tokenizer-model`).\n\n"
            f"Flags of pretrain_olmo_hybrid.py in no row that ran: {', '.join(missing) or 'none'}\n")


def parse_args(argv=None):
    """Command-line flags of the driver."""
    p = argparse.ArgumentParser(prog="gpu_check.py features", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=default_out("features"), help="logs/ and features.md [$OUT]")
    p.add_argument("--work", default=env("WORK", os.path.join(tempfile.gettempdir(), "gpu_check_features")),
                   help="checkpoints, data cache, TensorBoard [$WORK]")
    p.add_argument("--corpus", default=None, help="embedded corpus directory, built here [WORK/data]")
    p.add_argument("--entry", default="pretrain_olmo_hybrid.py", help="the trainer script")
    p.add_argument("--cpu", action="store_true", default=bool(env("CPU")),
                   help="CPU smoke: tiny preset, few iterations, gloo [$CPU]")
    p.add_argument("--rows", default=env("ROWS"), help="comma-separated row numbers (1-based) [$ROWS]")
    p.add_argument("--start", type=float, default=None, help="epoch seconds the budget counts from")
    p.add_argument("--budget-s", type=number(0), default=env("BUDGET_S", "510"),
                   help="no row starts after this many seconds [$BUDGET_S]")
    p.add_argument("--pack-logs", action="store_true", default=env("PACK_LOGS") == "1",
                   help="pack OUT/logs into OUT/feature_logs.tar.gz at the end [$PACK_LOGS=1]")
    p.add_argument("--dry-run", action="store_true", help="print the rows' commands, run nothing")
    args = p.parse_args(argv)
    args.start = time.time() if args.start is None else args.start
    args.out, args.work = os.path.abspath(args.out), os.path.abspath(args.work)
    args.corpus = os.path.abspath(args.corpus or os.path.join(args.work, "data"))
    if args.rows and not all(x.strip().isdigit() for x in args.rows.split(",")):
        p.error(f"--rows: comma-separated row numbers, e.g. 2,7,8; got {args.rows!r}")
    return args


def build_corpus(args, launcher: Launcher) -> threading.Thread:
    """Start building the embedded corpus into ``args.corpus`` (a thread; ``READY`` or ``FAILED``
    in the directory when done; the CPU smoke builds a small one)."""
    sizes = ["--max-chars", "300000", "--vocab-size", "1024"] if args.cpu else ["--workers", "4"]
    for mark in ("READY", "FAILED"):
        if os.path.exists(os.path.join(args.corpus, mark)):
            os.remove(os.path.join(args.corpus, mark))

    def build():
        rc = launcher.run(python("tools/build_embedded_corpus.py", ["--output-dir", args.corpus, *sizes]),
                          f"{args.out}/logs/00_corpus.log")
        open(os.path.join(args.corpus, "FAILED" if rc else "READY"), "w").close()

    print(f"[{time.strftime('%H:%M:%S')}] building the embedded corpus in {args.corpus} "
          "(beside the first row)", flush=True)
    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    return thread


def select_rows(rows: list[Row], spec: str | None) -> list[tuple[int, Row]]:
    """(number, row) of the rows numbered in ``spec`` ("2,7,8", 1-based, run order kept); all
    when None."""
    keep = {int(x) for x in spec.split(",")} if spec else None
    return [(i, r) for i, r in enumerate(rows, 1) if keep is None or i in keep]


def dry_run(rows: list[tuple[int, Row]], m: Mode, args) -> int:
    """Print each row's number, name and command (the run matrix); returns 0."""
    corpus = Corpus(args.corpus, args.work)
    for i, row in rows:
        argv = common_flags(m, args.work) + (corpus.flags if row.data else []) + row.flags
        cmd = ([sys.executable, args.entry] if row.launcher == "python" else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                args.entry])
        extra = f" (env {row.env})" if row.env else ""
        print(f"{i:2d} {row.name}{extra}:\n  (dry run) {shown(cmd + argv)}")
    return 0


def main(argv=None) -> int:
    """Run the rows, print and write the table; exit status 1 when a row did not run."""
    args = parse_args(argv)
    m = CPU if args.cpu else GPU
    numbered = select_rows(feature_rows(m, args.work, f"{args.corpus}/corpus_text_document"), args.rows)
    if args.dry_run:
        return dry_run(numbered, m, args)
    rows = [r for _, r in numbered]
    for key, value in {**hopper_selfcheck_env(), "CUDA_DEVICE_MAX_CONNECTIONS": "1",
                       "PYTHONUNBUFFERED": "1"}.items():
        os.environ.setdefault(key, value)
    for d in glob.glob(f"{args.work}/ckpt*"):  # a save row must not find an older run's checkpoint
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(f"{args.out}/logs", exist_ok=True)
    os.makedirs(args.work, exist_ok=True)   # the blend copy and the checkpoints live here
    os.makedirs(args.corpus, exist_ok=True)
    launcher = Launcher()
    corpus_build = build_corpus(args, launcher)
    try:
        results = run_rows(rows, m, args)
        compare_resume(results, "embedded corpus (baseline)", "resume (reload)", m.resume_tol)
        missing = uncovered_flags([r["argv"] for r in results.values() if r["ran"].startswith("yes")])
        with open(f"{args.out}/features.md", "w") as f:
            f.write(report(results, rows, m, args, missing))
        print(f"\n{len(rows)} rows in {time.time() - args.start:.0f} s; flags of pretrain_olmo_hybrid.py "
              f"in no row that ran: {', '.join(missing) or 'none'}\n"
              f"table: {args.out}/features.md\n\n{format_table(results)}", flush=True)
    except BaseException:
        launcher.stop_all()  # the corpus build (an interrupted check ends what it started)
        raise
    finally:
        corpus_build.join()
    if args.pack_logs:
        pack_logs(args.out, "logs", "feature_logs.tar.gz")
    return 0 if all(r["ran"].startswith("yes") for r in results.values()) else 1
