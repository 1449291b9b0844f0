"""GPU acceptance run of the training job: train, save, relaunch the same command, reload, train on.

    python tools/gpu_check.py training --out /tmp/out --iters 200

The ``olmo_hybrid_1b`` preset on the embedded corpus (built into ``OUT/data``) at sequence 4096,
bf16, one GPU, through ``examples/train_olmo_hybrid_1b.sh``. The first launch stops after the
checkpoint at iteration ``--half`` [iters / 2]; the same command relaunched reloads it and trains to
``--iters``. Logs: ``OUT/part1.log``, ``OUT/part2.log``; the run in ``OUT/run``. Prints a table
(tokens/s/GPU, MFU, peak memory, losses, reload) last, also written to ``OUT/training.md``. On
Hopper with Triton < 3.7.1 it opts in to the fla gradient self-check
(MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=1); the logs show the measured errors. Environment
fallbacks: OUT, ITERS, HALF, MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, WARMUP_ITERS, LR, LOG_INTERVAL.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import statistics
import sys

from megatron_hybrid.gpu_checks.runner import (
    Launcher,
    Tail,
    child_env,
    default_out,
    env,
    finish,
    hopper_selfcheck_env,
    log,
    markdown_table,
    python,
    whole,
)

SCRIPT = "examples/train_olmo_hybrid_1b.sh"


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch of the training script: its log name, extra flags, the lines shown live."""

    name: str
    flags: tuple[str, ...]
    shown: str  # regex of the log lines echoed to the terminal (cut at 330 characters)


def launches(half: int) -> list[Launch]:
    """The run matrix: stop after the checkpoint at ``half``, then the same command again."""
    return [Launch("part1", ("--exit-interval", str(half)), r"iteration|loss at|> |Error|LIFTED|KEPT"),
            Launch("part2", (), r"iteration|loss at|> |Error")]


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(prog="gpu_check.py training", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=default_out("training"), help="logs, data, run [$OUT]")
    p.add_argument("--iters", type=whole(2), default=env("ITERS", "200"), help="[$ITERS]")
    p.add_argument("--half", type=whole(1), default=env("HALF"),
                   help="checkpoint / first launch's exit iteration [$HALF, default iters / 2]")
    p.add_argument("--micro-batch-size", type=whole(1), default=env("MICRO_BATCH_SIZE", "4"))
    p.add_argument("--global-batch-size", type=whole(1), default=env("GLOBAL_BATCH_SIZE", "4"))
    p.add_argument("--warmup-iters", type=whole(0), default=env("WARMUP_ITERS", "20"))
    p.add_argument("--lr", default=env("LR", "6e-4"))
    p.add_argument("--log-interval", type=whole(1), default=env("LOG_INTERVAL", "5"))
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    args.half = args.iters // 2 if args.half is None else args.half
    if not 1 <= args.half < args.iters:
        p.error(f"--half must be in [1, --iters={args.iters}), got {args.half}")
    return args


def script_env(args, out: str) -> dict:
    """The environment examples/train_olmo_hybrid_1b.sh reads (its settings)."""
    half = str(args.half)
    return child_env(hopper_selfcheck_env(), {
        "RUN_DIR": f"{out}/run", "DATA_PATH": f"{out}/data/corpus_text_document",
        "TOKENIZER_MODEL": f"{out}/data/tokenizer.model", "GPUS_PER_NODE": "1",
        "SEQ_LENGTH": "4096", "MICRO_BATCH_SIZE": str(args.micro_batch_size),
        "GLOBAL_BATCH_SIZE": str(args.global_batch_size), "WARMUP_ITERS": str(args.warmup_iters),
        "LR": args.lr, "MIN_LR": "6e-5", "SAVE_INTERVAL": half, "LOG_INTERVAL": str(args.log_interval),
        "EVAL_INTERVAL": half, "EVAL_ITERS": "2", "SPLIT": "98,2,0", "TRAIN_ITERS": str(args.iters)})


ITERATION = re.compile(r"iteration\s+(\d+)/.*?tokens per second per GPU: ([\d.]+) \|"
                       r"(?: MFU: ([\d.]+)% \|)?.*?lm loss: ([-+\dEe.]+) \|.*?mem-max-allocated-gib: ([\d.]+)")


def summarise(texts: dict[str, str], half: int, log_interval: int) -> str:
    """The results table from the two logs (``{"part1": text, "part2": text}``).

    tokens/s and MFU: medians over the logged intervals after iteration 20 except the first one
    after the reload (warm-up / autotune), all of them for short runs. Raises ValueError when no
    iteration line was logged.
    """
    rows = {}
    for part, text in texts.items():
        for line in text.splitlines():
            m = ITERATION.search(line)
            if m:
                rows[int(m.group(1))] = (part, float(m.group(2)), float(m.group(3) or 0),
                                         float(m.group(4)), float(m.group(5)))
    its = sorted(rows)
    if not its:
        raise ValueError("no iteration lines in the logs (see part1.log / part2.log)")
    steady = [rows[i] for i in its if i > 20 and i != half + log_interval]
    steady = steady or [rows[i] for i in its]
    loaded = any("loaded checkpoint" in ln and f"iteration {half}" in ln
                 for ln in texts.get("part2", "").splitlines())
    return markdown_table(("quantity", "value"), [
        ("iterations logged", f"{its[0]}..{its[-1]} ({len(its)} lines)"),
        ("lm loss first -> last", f"{rows[its[0]][3]:.3f} -> {rows[its[-1]][3]:.3f}"),
        ("tokens/s/GPU (median, steady)", f"{statistics.median(r[1] for r in steady):,.0f}"),
        ("MFU (median, 989.4 TFLOP/s peak)", f"{statistics.median(r[2] for r in steady):.2f}%"),
        ("peak memory allocated (GiB)", f"{max(r[4] for r in rows.values()):.1f}"),
        (f"checkpoint at {half} reloaded by the relaunch", str(loaded))])


def main(argv=None) -> int:
    """Build the corpus, run both launches, print the table; the first failure's exit status."""
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    launcher = Launcher(dry_run=args.dry_run)
    if not args.dry_run:
        os.makedirs(out, exist_ok=True)
    tail = Tail(2)
    rc = launcher.run(python("tools/build_embedded_corpus.py", ["--output-dir", f"{out}/data"]),
                      echo=tail)
    if tail.lines:
        print(tail.text(), flush=True)
    if rc:
        return rc
    run_env = script_env(args, out)
    if not args.dry_run:
        shutil.rmtree(run_env["RUN_DIR"], ignore_errors=True)
    for i, launch in enumerate(launches(args.half)):
        log(f"launch {i + 1}: " + ("iterations 1..{h}, then save and exit" if i == 0 else
                                   "(same command): reload iteration {h}, train to {n}")
            .format(h=args.half, n=args.iters))
        path = os.path.join(out, f"{launch.name}.log")
        if not args.dry_run and os.path.exists(path):
            os.remove(path)
        rc = launcher.run(["bash", SCRIPT, *launch.flags], path, env=run_env,
                          echo=re.compile(launch.shown).search, width=330,
                          dry_prefix=f"TRAIN_ITERS={args.iters} ")
        if rc:
            return rc
    log("done")
    if args.dry_run:
        return 0
    texts = {}
    for launch in launches(args.half):
        with open(os.path.join(out, f"{launch.name}.log"), errors="replace") as f:
            texts[launch.name] = f.read()
    try:
        finish(summarise(texts, args.half, args.log_interval), os.path.join(out, "training.md"))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0

