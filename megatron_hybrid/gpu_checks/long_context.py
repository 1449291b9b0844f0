"""GPU check of long sequences: peak memory and step time of the 7B widths at 32K and 64K tokens.

    python tools/gpu_check.py long-context --out /tmp/out

The 7B widths at reduced depth (``--num-layers`` [4]: G-G-G-*), bf16, micro-batch 1, distributed
optimizer, full recompute, mock data, ``--iters`` [4] iterations per sequence length
(``--seq-lengths`` [32768 65536]), one GPU, through ``pretrain_olmo_hybrid.py`` (one torchrun per
length, log ``OUT/seq<S>.log``). Prints, last, a table of peak memory allocated and step time
(median of the iterations after the first, which includes fla's autotuning), also written to
``OUT/long_context.md``. The run's own Hopper self-check opt-in applies. ``--extra`` adds trainer
flags (e.g. ``--extra=--intra-document-masking``). Environment fallbacks: OUT, SEQ_LENGTHS,
NUM_LAYERS, ITERS, RUN_TIMEOUT, EXTRA.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics

from megatron_hybrid.gpu_checks.runner import (
    Launcher,
    child_env,
    default_out,
    env,
    finish,
    hopper_selfcheck_env,
    log,
    markdown_table,
    torchrun,
    whole,
    whole_list,
)


def parse_args(argv=None):
    """Command-line flags (environment fallbacks in brackets in ``--help``)."""
    p = argparse.ArgumentParser(prog="gpu_check.py long-context", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=default_out("long_context"), help="logs and table [$OUT]")
    p.add_argument("--seq-lengths", type=whole(1), nargs="+",
                   default=whole_list(env("SEQ_LENGTHS", "32768 65536"), 1, "SEQ_LENGTHS"),
                   help="sequence lengths, one run each [$SEQ_LENGTHS]")
    p.add_argument("--num-layers", type=whole(1), default=env("NUM_LAYERS", "4"))
    p.add_argument("--iters", type=whole(1), default=env("ITERS", "4"), help="per length")
    p.add_argument("--run-timeout", type=whole(1), default=env("RUN_TIMEOUT", "280"),
                   help="seconds per run [$RUN_TIMEOUT]")
    p.add_argument("--extra", default=env("EXTRA", ""), help="more trainer flags, one string")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


def trainer_args(seq: int, args) -> list[str]:
    """pretrain_olmo_hybrid.py flags of the run at sequence length ``seq``."""
    return ["--model-preset", "olmo_hybrid_7b", "--num-layers", str(args.num_layers),
            "--seq-length", str(seq), "--max-position-embeddings", str(seq),
            "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", str(args.iters),
            "--lr", "3e-4", "--lr-warmup-iters", "1", "--bf16", "--use-distributed-optimizer",
            "--recompute-granularity", "full", "--mock-data", "--vocab-size", "100278",
            "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0",
            *shlex.split(args.extra)]


def summarise(text: str, seq: int) -> list:
    """One table row from a run's log: sequence, peak GiB, step s (median after the first), tokens/s."""
    ms = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([\d.]+)", text)]
    mem = [float(x) for x in re.findall(r"mem-max-allocated-gib: ([\d.]+)", text)]
    if not ms:
        return [seq, "-", "-", f"- (see seq{seq}.log)"]
    step = statistics.median(ms[1:] or ms) / 1000
    return [seq, f"{max(mem) if mem else float('nan'):.1f}", f"{step:.2f}", f"{seq / step:,.0f}"]


HEADER = ("sequence", "peak memory allocated (GiB)", "step time (s, median after the first)",
          "tokens/s")


def main(argv=None) -> int:
    """Run each length, print the table last; returns 0."""
    args = parse_args(argv)
    launcher = Launcher(dry_run=args.dry_run)
    out = os.path.abspath(args.out)
    if not args.dry_run:
        os.makedirs(out, exist_ok=True)
    run_env = child_env(hopper_selfcheck_env(), {"CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    for seq in args.seq_lengths:
        log(f"sequence {seq}")
        path = os.path.join(out, f"seq{seq}.log")
        if not args.dry_run and os.path.exists(path):
            os.remove(path)
        rc = launcher.run(torchrun(1, "pretrain_olmo_hybrid.py", trainer_args(seq, args)), path,
                          args.run_timeout, run_env)
        if not args.dry_run:
            print(f"  exit status {rc}")
            with open(path, errors="replace") as f:
                hits = [ln.rstrip("\n")[:260] for ln in f if re.search(r"iteration|Error|error", ln)]
            print("\n".join(hits[-6:]))
    if args.dry_run:
        return 0
    rows = []
    for seq in args.seq_lengths:
        with open(os.path.join(out, f"seq{seq}.log"), errors="replace") as f:
            rows.append(summarise(f.read(), seq))
    finish(markdown_table(HEADER, rows), os.path.join(out, "long_context.md"))
    return 0
