"""GPU run of tools/benchmark.py with a time budget: ours vs HF transformers vs megatron-core's GDN.

    python tools/gpu_check.py benchmark --out /tmp/out [--engines ours,hf --iters 10 ...]

The 7B widths at 8 layers, S 8192, bf16, micro-batch 1; per-layer-kind breakdown and the 32-layer
extrapolation (``megatron_hybrid/benchmark/``). Budget: the benchmark skips phases that would start
after ``--max-minutes`` [6.0]; at ``--hard-limit-s`` [420] s it gets SIGTERM (it then writes what it
measured; SIGKILL 30 s later). Results: ``OUT/performance.md`` (copy to docs/performance.md),
``OUT/benchmark.json``, ``OUT/benchmark.log`` (with TRITON_PRINT_AUTOTUNING=1: every autotuned
kernel, key and time; summed per kernel at its end). Flags this driver does not know go to
tools/benchmark.py. Prints the engine table of performance.md last. On Hopper with Triton < 3.7.1 it
opts in to the fla gradient self-check. A cold machine can spend the whole budget compiling fla's
autotune candidates: carry Triton's cache between machines (``tools/gpu_kernel_cache.sh``, run
before and after this command). Environment fallbacks: OUT, MAX_MINUTES, HARD_LIMIT_S.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import time

from megatron_hybrid.gpu_checks.runner import (
    TIMED_OUT,
    Launcher,
    child_env,
    default_out,
    dir_mb,
    env,
    gpu_query,
    log,
    number,
    python,
    whole,
)

#: TRITON_PRINT_AUTOTUNING's lines: kept in the log, not shown live
AUTOTUNE_LINE = re.compile(r"^(Triton autotuning for function|with key as|finished after|best config selected)")
AUTOTUNE = re.compile(r"Triton autotuning for function (\S+?),\s*with key as (.*?),\s*finished after "
                      r"([\d.]+)s", re.S)


def parse_args(argv=None):
    """Command-line flags; returns (args, the flags for tools/benchmark.py)."""
    p = argparse.ArgumentParser(prog="gpu_check.py benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=default_out("benchmark"), help="results and log [$OUT]")
    p.add_argument("--max-minutes", type=number(0, strict=True), default=env("MAX_MINUTES", "6.0"),
                   help="no benchmark phase starts after this [$MAX_MINUTES]")
    p.add_argument("--hard-limit-s", type=whole(1), default=env("HARD_LIMIT_S", "420"),
                   help="SIGTERM to the benchmark after this many seconds [$HARD_LIMIT_S]")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    args, rest = p.parse_known_args(argv)
    return args, [a for a in rest if a != "--"]


def autotune_summary(text: str, top: int = 15) -> str:
    """Autotune sessions in a log (TRITON_PRINT_AUTOTUNING): count, seconds, the slowest kernels."""
    per = collections.defaultdict(lambda: [0, 0.0])
    hits = AUTOTUNE.findall(text)
    for name, _, sec in hits:
        per[name][0] += 1
        per[name][1] += float(sec)
    lines = [f"autotune sessions in this run: {len(hits)}, {sum(v[1] for v in per.values()):.1f} s "
             f"(TRITON_PRINT_AUTOTUNING; keys served from the disk cache are not listed)"]
    for name, (n, sec) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {name:48s} {n:3d} keys {sec:7.1f} s")
    return "\n".join(lines)


def engine_table(markdown: str) -> str:
    """The engine tables of performance.md: each block from a line starting ``| |`` to the next
    blank line (as ``sed -n '/^| |/,/^$/p'``, the blank line dropped)."""
    out, inside = [], False
    for line in markdown.splitlines():
        if not inside and line.startswith("| |"):
            inside = True
        if inside:
            if not line.strip():
                inside = False
                out.append("")
            else:
                out.append(line)
    return "\n".join(out).strip("\n")


def _header() -> list[str]:
    """The log's first lines: the GPU and its clocks, the kernel caches present."""
    gpu = gpu_query("name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw")
    home = os.path.expanduser("~")
    fla = len(glob.glob(os.path.join(home, ".cache", "fla*")))
    triton = dir_mb(os.path.join(home, ".triton", "cache"))
    stamp = time.strftime("%H:%M:%S")
    return [f"[{stamp}] {'; '.join(gpu) or 'nvidia-smi: no GPU listed'}",
            f"[{stamp}] kernel caches: {triton} MB triton, {fla} fla dirs"]


def main(argv=None) -> int:
    """Run the benchmark; its exit status (124: stopped at --hard-limit-s)."""
    args, extra = parse_args(argv)
    out = os.path.abspath(args.out)
    cmd = python("tools/benchmark.py", ["--max-minutes", f"{args.max_minutes:g}", "--profile",
                                        "--output-json", f"{out}/benchmark.json",
                                        "--output-md", f"{out}/performance.md", *extra])
    launcher = Launcher(dry_run=args.dry_run, kill_after_s=30)
    if args.dry_run:
        launcher.run(cmd, dry_prefix=f"(hard limit {args.hard_limit_s} s) ")
        return 0
    os.makedirs(out, exist_ok=True)
    logf = f"{out}/benchmark.log"
    header = _header()
    print("\n".join(header), flush=True)
    with open(logf, "w") as f:
        f.write("\n".join(header) + "\n")
    run_env = child_env({"MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK": "1", "TRITON_PRINT_AUTOTUNING": "1"},
                        {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    start = time.time()
    rc = launcher.run(cmd, logf, args.hard_limit_s, run_env,
                      echo=lambda ln: not AUTOTUNE_LINE.match(ln))
    log(f"benchmark exit code {rc} after {time.time() - start:.0f} s ({TIMED_OUT}: hard limit)")
    with open(logf, errors="replace") as f:
        summary = autotune_summary(f.read())
    print(summary, flush=True)
    with open(logf, "a") as f:
        f.write(summary + "\n")
    md = f"{out}/performance.md"
    if os.path.exists(md) and os.path.getsize(md):
        with open(md) as f:
            print(f"----- {md} (engine table) -----\n{engine_table(f.read())}", flush=True)
    return rc
