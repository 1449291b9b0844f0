"""GPU check of the parallelism tuner: predicted vs measured peak memory and tokens/s, per plan.

    python tools/gpu_check.py tuner --out /tmp/out

The ``olmo_hybrid_1b`` preset on one GPU, bf16, distributed optimizer, mock data, ``--iters`` [6]
iterations per plan through ``tools/tune_parallelism.py --measure`` (torchrun
``pretrain_olmo_hybrid.py --mock-data``; logs under ``OUT/logs/<plan>/``, records appended to
``OUT/results.jsonl``). Prints, last, the markdown table of predicted vs measured peak memory
(``torch.cuda.max_memory_allocated``) and tokens/s/GPU with the error of each, also written to
``OUT/tuner.md``. ``--plans``: space-separated MICRO_BATCH:SEQ_LENGTH:RECOMPUTE:VOCAB (the default's
last plan is the configuration of the reference run in docs/gpu.md, 57.4 GiB and 46,800
tokens/s/GPU on an H200); ``--gpu-memory-gb`` [141] is the memory the tuner plans with;
``--model-preset tiny`` is a CPU smoke run. About 60-90 s per plan on an H200 (start-up, the fla
warm-up for the plan's shapes, fla's Hopper self-check, 6 iterations). On Hopper with
Triton < 3.7.1 it opts in to the fla gradient self-check. Environment fallbacks: OUT, PLANS, ITERS,
GPU_MEMORY_GB, RUN_TIMEOUT, MODEL_PRESET.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re

from megatron_hybrid.gpu_checks.runner import (
    Launcher,
    Tail,
    child_env,
    default_out,
    env,
    finish,
    hopper_selfcheck_env,
    log,
    number,
    python,
    whole,
)

RECOMPUTE = ("none", "selective", "full")
DEFAULT_PLANS = "1:4096:none:100278 2:4096:selective:8192 1:8192:full:8192 4:4096:none:8192"


@dataclasses.dataclass(frozen=True)
class Plan:
    """One measured configuration (micro-batch = global batch: one GPU, one micro-batch)."""

    micro_batch: int
    seq_length: int
    recompute: str
    vocab: int

    @property
    def name(self) -> str:
        return f"mbs{self.micro_batch}_seq{self.seq_length}_{self.recompute}_vocab{self.vocab}"


def parse_plan(text: str) -> Plan:
    """``MICRO_BATCH:SEQ_LENGTH:RECOMPUTE:VOCAB`` -> Plan (an argparse type)."""
    parts = text.split(":")
    if len(parts) != 4 or parts[2] not in RECOMPUTE or not all(
            p.isdigit() and int(p) > 0 for p in (parts[0], parts[1], parts[3])):
        raise argparse.ArgumentTypeError(
            f"a plan is MICRO_BATCH:SEQ_LENGTH:RECOMPUTE:VOCAB (whole numbers > 0, recompute one of "
            f"{', '.join(RECOMPUTE)}), got {text!r}")
    return Plan(int(parts[0]), int(parts[1]), parts[2], int(parts[3]))


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(prog="gpu_check.py tuner", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=default_out("tuner"), help="logs and results [$OUT]")
    p.add_argument("--plans", nargs="+", type=parse_plan, default=None,
                   help=f"MICRO_BATCH:SEQ_LENGTH:RECOMPUTE:VOCAB ... [$PLANS, {DEFAULT_PLANS}]")
    p.add_argument("--iters", type=whole(3), default=env("ITERS", "6"), help="per plan [$ITERS]")
    p.add_argument("--gpu-memory-gb", type=number(0, strict=True), default=env("GPU_MEMORY_GB", "141"))
    p.add_argument("--run-timeout", type=whole(1), default=env("RUN_TIMEOUT", "300"),
                   help="seconds per plan [$RUN_TIMEOUT]")
    p.add_argument("--model-preset", default=env("MODEL_PRESET", "olmo_hybrid_1b"))
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    if args.plans is None:
        try:
            args.plans = [parse_plan(t) for t in env("PLANS", DEFAULT_PLANS).split()]
        except argparse.ArgumentTypeError as exc:
            p.error(f"PLANS (environment): {exc}")
    return args


def tuner_args(plan: Plan, args, out: str) -> list[str]:
    """tools/tune_parallelism.py flags that predict and measure ``plan`` on one GPU."""
    logs = f"{out}/logs/{plan.name}"
    return ["--model-preset", args.model_preset, "--vocab-size", str(plan.vocab), "--num-gpus", "1",
            "--gpu-memory-gb", f"{args.gpu_memory_gb:g}", "--seq-length", str(plan.seq_length),
            "--global-batch-size", str(plan.micro_batch), "--micro-batch-size", str(plan.micro_batch),
            "--recompute-granularity", plan.recompute, "--tensor-model-parallel-size", "1",
            "--pipeline-model-parallel-size", "1", "--use-distributed-optimizer", "--top", "1",
            "--measure", "--measure-top-k", "1", "--measure-iters", str(args.iters),
            "--measure-dir", logs, "--measure-output", f"{out}/results.jsonl",
            "--measure-timeout", str(args.run_timeout)]


SHOWN = re.compile(r"^\[|^\||error|no iteration")


def main(argv=None) -> int:
    """Measure each plan, print the report last; 1 when no plan was measured."""
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    launcher = Launcher(dry_run=args.dry_run)
    results = f"{out}/results.jsonl"
    if not args.dry_run:
        os.makedirs(f"{out}/logs", exist_ok=True)
        if os.path.exists(results):
            os.remove(results)
    run_env = child_env(hopper_selfcheck_env())
    for plan in args.plans:
        log(f"micro-batch {plan.micro_batch}, sequence {plan.seq_length}, recompute "
            f"{plan.recompute}, vocabulary {plan.vocab}")
        shown = []
        rc = launcher.run(python("tools/tune_parallelism.py", tuner_args(plan, args, out)), env=run_env,
                          echo=lambda ln, s=shown: bool(SHOWN.search(ln)) and not s.append(ln))
        if not args.dry_run and (rc or not shown):
            print(f"  (no result for this plan: see {out}/logs/{plan.name})")
        errors = []
        for path in sorted(glob.glob(f"{out}/logs/{plan.name}/*.log")):
            with open(path, errors="replace") as f:
                errors += [ln.rstrip("\n") for ln in f if re.search(r"Error|error:", ln)]
        if errors:
            print("\n".join(errors[-3:]))
    log("done")
    if args.dry_run:
        return 0
    if not (os.path.exists(results) and os.path.getsize(results)):
        print(f"no measurement recorded (see {out}/logs)")
        return 1
    tail = Tail(10 ** 6)
    rc = launcher.run(python("tools/tune_parallelism.py", ["--measure-report", results]), echo=tail)
    finish(tail.text(), f"{out}/tuner.md")
    return rc
