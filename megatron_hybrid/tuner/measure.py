"""``--measure``: run plans for a few iterations and compare with the prediction.

Each plan runs as ``python -m torch.distributed.run --standalone --nproc-per-node N
pretrain_olmo_hybrid.py ... --mock-data --log-interval 1`` on this machine (one node). The
trainer's log line of every iteration carries ``tokens per second per GPU`` and
``mem-max-allocated-gib`` (``torch.cuda.max_memory_allocated`` of the last rank, i.e. the last
pipeline stage); measured throughput is the median over the iterations after the first third
(warm-up, fla autotuning), measured memory the largest value. The prediction it is compared to is
the last stage's peak for the run's own global batch.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace

from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.tuner.memory import GIB
from megatron_hybrid.tuner.plans import Job, Plan
from megatron_hybrid.tuner.report import model_flags, parallel_flags
from megatron_hybrid.tuner.search import Evaluation, evaluate
from megatron_hybrid.tuner.throughput import Efficiencies, Hardware

_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?tokens per second per GPU: ([\d.]+) \|")
_MEM = re.compile(r"(mem-max-allocated-gib|peak-rss-gib): ([\d.]+)")


def repo_root() -> str:
    """The checkout holding ``pretrain_olmo_hybrid.py`` (parent of the package directory)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure_command(cfg: OlmoHybridConfig, plan: Plan, job: Job, iters: int,
                    python: str = sys.executable) -> list[str]:
    """The torchrun command line that trains ``plan`` on mock data for ``iters`` iterations."""
    world = plan.tp * plan.pp * plan.cp * plan.dp
    cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           os.path.join(repo_root(), "pretrain_olmo_hybrid.py")]
    cmd += model_flags(cfg) + ["--vocab-size", str(cfg.vocab_size)]
    cmd += parallel_flags(cfg, plan, job)
    cmd += ["--train-iters", str(iters), "--lr", "1e-4", "--min-lr", "1e-5",
            "--lr-warmup-iters", "0", "--mock-data", "--log-interval", "1",
            "--eval-iters", "0", "--eval-interval", str(iters + 1), "--split", "100,0,0",
            "--num-workers", "1", "--z-loss-weight", "1e-5" if job.z_loss else "0"]
    return cmd


def parse_log(text: str) -> dict[str, list[float]]:
    """{'iteration', 'tokens_per_s', 'mem_gib', 'mem_kind'} lists from the trainer's iteration
    lines (``mem_kind``: ``mem-max-allocated-gib`` on CUDA, ``peak-rss-gib`` on CPU)."""
    out = {"iteration": [], "tokens_per_s": [], "mem_gib": [], "mem_kind": []}
    for line in text.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        out["iteration"].append(int(m.group(1)))
        out["tokens_per_s"].append(float(m.group(2)))
        mem = _MEM.search(line)
        out["mem_gib"].append(float(mem.group(2)) if mem else float("nan"))
        out["mem_kind"].append(mem.group(1) if mem else None)
    return out


def summarise(parsed: dict[str, list[float]]) -> dict[str, float | None]:
    """Measured peak memory (GiB, the largest) and tokens/s/GPU (median after warm-up)."""
    tps = parsed["tokens_per_s"]
    if not tps:
        return {"mem_gib": None, "tokens_per_s": None, "mem_kind": None}
    skip = max(1, len(tps) // 3)
    steady = tps[skip:] or tps
    mems = [m for m in parsed["mem_gib"] if m == m]
    kinds = [k for k in parsed["mem_kind"] if k]
    return {"mem_gib": max(mems) if mems else None, "tokens_per_s": statistics.median(steady),
            "mem_kind": kinds[-1] if kinds else None}


def evaluation_record(cfg: OlmoHybridConfig, ev: Evaluation, job: Job) -> dict:
    """A JSON-able summary of one evaluated plan."""
    p, t = ev.plan, ev.throughput
    return {"plan": p.label(), "tp": p.tp, "pp": p.pp, "dp": p.dp, "cp": p.cp, "mbs": p.mbs,
            "num_microbatches": p.num_microbatches, "recompute": p.recompute,
            "distributed_optimizer": p.distributed_optimizer, "stage_sizes": list(p.stage_sizes),
            "seq_length": job.seq_length, "global_batch_size": job.global_batch_size,
            "vocab_size": cfg.vocab_size, "status": ev.status,
            "peak_gib": ev.peak / GIB if ev.memory else None,
            "last_stage_peak_gib": ev.memory[-1].peak / GIB if ev.memory else None,
            "tokens_per_s_per_gpu": t.tokens_per_s_per_gpu if t else None,
            "mfu": t.mfu if t else None}


def measure_plans(cfg: OlmoHybridConfig, evals: list[Evaluation], job: Job, hw: Hardware,
                  eff: Efficiencies, args) -> int:
    """Run each plan, print predicted vs measured, append records to ``--measure-output``.
    Returns 0 when every run produced iteration lines, else 1."""
    os.makedirs(args.measure_dir, exist_ok=True)
    records, status = [], 0
    for i, ev in enumerate(evals, 1):
        gbs = args.measure_global_batch_size or job.global_batch_size
        mjob = replace(job, global_batch_size=gbs)
        per = ev.plan.mbs * ev.plan.dp
        if gbs % per:
            print(f"skip {ev.plan.label()}: --measure-global-batch-size {gbs} is not divisible "
                  f"by micro-batch x DP = {per}")
            continue
        plan = replace(ev.plan, num_microbatches=gbs // per)
        pred = evaluate(cfg, plan, mjob, hw, eff)
        cmd = measure_command(cfg, plan, mjob, args.measure_iters)
        log = os.path.join(args.measure_dir, f"plan{i}_{plan.label().replace(' ', '_')}.log")
        print(f"\n[{time.strftime('%H:%M:%S')}] measuring {plan.label()} (global batch {gbs}): "
              f"log {log}\n  " + " ".join(cmd), flush=True)
        if args.measure_dry_run:
            continue
        env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1")
        t0 = time.time()
        try:
            with open(log, "w") as f:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    cwd=repo_root(), timeout=args.measure_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        with open(log) as f:
            got = summarise(parse_log(f.read()))
        rec = evaluation_record(cfg, pred, mjob)
        rec.update(measured_mem_gib=got["mem_gib"], measured_tokens_per_s=got["tokens_per_s"],
                   measured_mem_kind=got["mem_kind"],
                   returncode=rc, wall_s=round(time.time() - t0, 1), log=log)
        records.append(rec)
        if got["tokens_per_s"] is None:
            status = 1
            print(f"  no iteration lines (exit {rc}); see {log}")
        if args.measure_output:
            with open(args.measure_output, "a") as f:
                f.write(json.dumps(rec) + "\n")
    if records:
        print()
        print(summary_table(records))
    return status


def load_records(path: str) -> list[dict]:
    """Records of a ``--measure-output`` file (JSON lines)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _err(pred: float | None, meas: float | None) -> str:
    if pred is None or not meas:
        return "-"
    return f"{100 * (pred - meas) / meas:+.1f}%"


def summary_table(records: list[dict]) -> str:
    """Markdown table: predicted vs measured peak memory (last rank) and tokens/s/GPU."""
    lines = ["| plan | seq | vocab | predicted peak GiB | measured peak GiB | error | "
             "predicted tokens/s/GPU | measured tokens/s/GPU | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        pm, mm = r.get("last_stage_peak_gib"), r.get("measured_mem_gib")
        pt, mt = r.get("tokens_per_s_per_gpu"), r.get("measured_tokens_per_s")
        rss = " (CPU RSS)" if r.get("measured_mem_kind") == "peak-rss-gib" else ""
        lines.append(
            f"| {r['plan']} | {r['seq_length']} | {r['vocab_size']} | "
            f"{pm:.1f} | {'-' if mm is None else f'{mm:.1f}'}{rss} | {_err(pm, mm)} | "
            f"{'-' if pt is None else f'{pt:,.0f}'} | {'-' if mt is None else f'{mt:,.0f}'} | "
            f"{_err(pt, mt)} |")
    return "\n".join(lines)
