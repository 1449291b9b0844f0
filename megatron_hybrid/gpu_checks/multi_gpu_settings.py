"""Settings of the multi-GPU check: its flags (environment fallbacks), the devices, the layouts.

Every setting is checked before anything runs or ``--out`` is touched; a bad one exits with status 2
and an error naming the flag (or environment variable) and what it allows. The layouts are data:
:data:`LAYOUTS` (name -> processes, description, trainer flags); the scaling models are
:data:`SCALING_MODELS` (key -> trainer flags, sequence, global batch per GPU, vocabulary).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

from megatron_hybrid.gpu_checks.runner import ROOT, default_out, env, gpu_query, number, whole


@dataclasses.dataclass(frozen=True)
class Layout:
    """A parallel layout: ``nproc`` GPUs (processes), its description and trainer flags (every run
    also has the distributed optimizer)."""

    name: str
    nproc: int
    desc: str
    flags: tuple[str, ...] = ()


_TP2, _PP2, _SP = ("--tensor-model-parallel-size", "2"), ("--pipeline-model-parallel-size", "2"), \
    ("--sequence-parallel",)
LAYOUTS = {lay.name: lay for lay in [
    Layout("ref", 1, "TP1 PP1"),
    Layout("dp2", 2, "DP2, distributed opt."),
    Layout("tp2_sp", 2, "TP2 + SP", _TP2 + _SP),
    Layout("tp2_nosp", 2, "TP2, no SP", _TP2),
    Layout("pp2", 2, "PP2", _PP2),
    Layout("cp2", 2, "CP2", ("--context-parallel-size", "2")),
    Layout("tp2pp2_sp", 4, "TP2 x PP2 + SP", _TP2 + _PP2 + _SP),
    Layout("tp2pp2_nosp", 4, "TP2 x PP2, no SP", _TP2 + _PP2),
    Layout("tp2pp2dp2_sp", 8, "TP2 x PP2 x DP2 + SP", _TP2 + _PP2 + _SP),
]}
GPU_LAYOUTS = ("ref", "dp2", "tp2_sp", "pp2", "cp2", "tp2_nosp", "tp2pp2_sp", "tp2pp2_nosp")
CPU_LAYOUTS = ("ref", "dp2", "tp2_sp", "pp2", "cp2", "tp2pp2_sp")
RESUME = "resume_tp1"


@dataclasses.dataclass(frozen=True)
class ScalingModel:
    flags: tuple[str, ...]
    seq: int
    per_gpu: int  # global batch per GPU
    vocab: int


SCALING_MODELS = {
    "1b": ScalingModel(("--model-preset", "olmo_hybrid_1b"), 4096, 8, 100278),
    "7b8l": ScalingModel(("--model-preset", "olmo_hybrid_7b", "--num-layers", "8"), 8192, 4, 100278),
    "tiny": ScalingModel(("--model-preset", "tiny"), 256, 2, 8192),
}
DEFAULT_CORR_MODEL = "--model-preset tiny --linear-key-head-dim 96 --linear-value-head-dim 192"


def _flag(name: str, default: str = "0") -> bool:
    value = env(name, default)
    if value not in ("0", "1"):
        print(f"gpu_check.py multi-gpu: error: {name} must be 0 or 1, got {value!r}", file=sys.stderr)
        raise SystemExit(2)
    return value == "1"


def build_parser() -> argparse.ArgumentParser:
    """The flags; defaults marked CPU/GPU depend on ``--cpu-smoke``."""
    p = argparse.ArgumentParser(prog="gpu_check.py multi-gpu",
                                description="Multi-GPU check: layouts vs one GPU, a checkpoint "
                                            "across layouts, scaling (docs/gpu.md).")
    a = p.add_argument
    a("--out", default=default_out("multi_gpu"), help="logs and tables [$OUT]")
    a("--cpu-smoke", action="store_true", default=_flag("CPU_SMOKE"), help="gloo on CPU [$CPU_SMOKE]")
    a("--dry-run", action="store_true", default=_flag("DRY_RUN"), help="waves and commands only")
    a("--no-scaling", dest="scaling", action="store_false", default=_flag("SCALING", "1"),
      help="skip the scaling part [$SCALING=0]")
    a("--scaling-serial", action="store_true", default=_flag("SCALING_SERIAL"),
      help="scaling runs one at a time [$SCALING_SERIAL]")
    a("--keep-work", action="store_true", default=_flag("KEEP_WORK"), help="keep the checkpoints")
    a("--num-gpus", type=whole(1), default=env("NUM_GPUS"), help="pretend a GPU count (with --dry-run)")
    a("--max-gpus", type=whole(1), default=env("MAX_GPUS"), help="use at most this many GPUs")
    a("--budget-s", type=whole(1), default=env("BUDGET_S", "480"), help="no wave starts after this")
    a("--iters", type=whole(2), default=env("ITERS"), help="correctness iterations [GPU 20, CPU 3]")
    a("--save-at", type=whole(1), default=env("SAVE_AT"), help="checkpoint iteration [GPU 10, CPU 2]")
    a("--corr-seq-length", type=whole(1), default=env("CORR_SEQ_LENGTH"), help="[GPU 1024, CPU 256]")
    a("--corr-run-timeout", type=whole(1), default=env("CORR_RUN_TIMEOUT", "300"))
    a("--scaling-run-timeout", type=whole(1), default=env("SCALING_RUN_TIMEOUT", "240"))
    a("--min-start-s", type=whole(0), default=env("MIN_START_S", "40"),
      help="a wave starts only with this much of the budget left")
    a("--init-threads", type=whole(1), default=env("INIT_THREADS", "4"),
      help="OMP threads of the CPU run that writes the initial weights")
    a("--scaling-iters", type=whole(3), default=env("SCALING_ITERS"), help="[GPU 8, CPU 3]")
    a("--scaling-models", nargs="+", default=None, help="1b 7b8l tiny [GPU 1b 7b8l, CPU tiny]")
    a("--scaling-gpus", nargs="+", default=None, help="GPU counts [GPU 1 2 4 8 up to the machine's, CPU 1]")
    a("--layouts", nargs="+", default=None, help=f"of {', '.join(LAYOUTS)} (ref always runs)")
    a("--ckpt-source", default=env("CKPT_SOURCE"), help="layout that saves [tp2pp2_sp; tp2_sp < 4 GPUs]")
    a("--corr-dtype", choices=("fp32", "bf16"), default=env("CORR_DTYPE", "fp32"))
    a("--corr-kernels", choices=("auto", "fla", "torch"), default=env("CORR_KERNELS", "auto"))
    a("--rtol", default=env("RTOL"), help="relative loss tolerance [fp32 1e-3, bf16 1e-2]")
    a("--atol", default=env("ATOL", "0"), help="absolute loss tolerance")
    a("--corr-model", default=env("CORR_MODEL", DEFAULT_CORR_MODEL), help="model flags, one string")
    a("--gpu-memory-gb", default=env("GPU_MEMORY_GB"), help="[nvidia-smi's, else 141]")
    a("--data-dir", default=env("DATA_DIR", os.path.join(ROOT, "data", "embedded")))
    a("--work-dir", default=env("WORK_DIR"), help="checkpoints go below it [$TMPDIR]")
    return p


def _list(values, name: str) -> list[str] | None:
    if values is not None:
        return list(values)
    text = env(name)
    return text.split() if text is not None else None


def find_devices(args, fail) -> tuple[list[str], str]:
    """(device ids, a description); ``fail(message)`` exits when there is none."""
    if args.cpu_smoke:
        return ["cpu"] * 4, "CPU smoke: up to 4 gloo processes"
    where = (gpu_query("name") or [""])[0]
    if args.num_gpus:
        devices = [str(i) for i in range(args.num_gpus)]
    elif env("CUDA_VISIBLE_DEVICES"):
        devices = env("CUDA_VISIBLE_DEVICES").split(",")
    else:
        n = _count_gpus()
        if n == 0:
            fail("no GPU found (nvidia-smi -L, torch.cuda.device_count()); --cpu-smoke runs the CPU "
                 "smoke test, --dry-run --num-gpus N shows the plan")
        devices = [str(i) for i in range(n)]
    return devices[:args.max_gpus] if args.max_gpus else devices, where


def _count_gpus() -> int:
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        n = sum(ln.startswith("GPU") for ln in r.stdout.splitlines())
    except (OSError, subprocess.TimeoutExpired):
        n = 0
    if n == 0:
        import torch

        n = torch.cuda.device_count()
    return n


def _check_number(p, text, what, strict=False) -> str:
    try:
        number(0, strict)(text)
    except argparse.ArgumentTypeError as exc:
        p.error(f"{what} {exc}")
    return text


def settings(argv=None):
    """Parsed and checked settings, devices included (``args.devices``, ``args.where``)."""
    p = build_parser()
    args = p.parse_args(argv)
    args.devices, args.where = find_devices(args, p.error)
    cpu, ndev = args.cpu_smoke, len(args.devices)
    args.iters = args.iters or (3 if cpu else 20)
    args.save_at = args.save_at or (2 if cpu else 10)
    args.seq = args.corr_seq_length or (256 if cpu else 1024)
    args.scaling_iters = args.scaling_iters or (3 if cpu else 8)
    if not args.save_at < args.iters:
        p.error(f"--save-at must be in [1, --iters={args.iters}), got {args.save_at}")
    args.rtol = _check_number(p, args.rtol or ("1e-3" if args.corr_dtype == "fp32" else "1e-2"), "--rtol")
    args.atol = _check_number(p, args.atol, "--atol")
    mem = gpu_query("memory.total")
    args.gpu_memory_gb = args.gpu_memory_gb or (
        f"{float(mem[0].split()[0]) / 1024:.1f}" if mem and mem[0].split()[0].isdigit() else "141")
    _check_number(p, args.gpu_memory_gb, "--gpu-memory-gb", strict=True)
    layouts = _list(args.layouts, "LAYOUTS") or list(CPU_LAYOUTS if cpu else GPU_LAYOUTS)
    for name in layouts:
        if name not in LAYOUTS:
            p.error(f"--layouts: unknown layout {name!r} (allowed: {', '.join(LAYOUTS)})")
    args.layouts = layouts if "ref" in layouts else ["ref", *layouts]  # the reference always runs
    if args.ckpt_source is None:
        args.ckpt_source = "tp2pp2_sp" if ndev >= 4 and "tp2pp2_sp" in args.layouts else "tp2_sp"
    if args.ckpt_source not in LAYOUTS:
        p.error(f"--ckpt-source: unknown layout {args.ckpt_source!r} (allowed: {', '.join(LAYOUTS)})")
    if args.scaling:
        _scaling_settings(p, args, cpu, ndev)
    return args


def _scaling_settings(p, args, cpu: bool, ndev: int) -> None:
    models = _list(args.scaling_models, "SCALING_MODELS")
    args.scaling_models = models if models is not None else (["tiny"] if cpu else ["1b", "7b8l"])
    if not args.scaling_models:
        p.error("--scaling-models is empty: name 1b, 7b8l or tiny (--no-scaling skips the scaling)")
    for m in args.scaling_models:
        if m not in SCALING_MODELS:
            p.error(f"--scaling-models: unknown model {m!r} (allowed: {', '.join(SCALING_MODELS)})")
    gpus = _list(args.scaling_gpus, "SCALING_GPUS")
    if gpus is None:
        gpus = ["1"] if cpu else [str(n) for n in sorted({1, 2, 4, 8, ndev}) if n <= ndev]
    if not gpus:
        p.error("--scaling-gpus is empty: name GPU counts, e.g. 1 2 4 (--no-scaling skips the scaling)")
    for n in gpus:
        if not (n.isdigit() and len(n) <= 4 and int(n) >= 1):
            p.error(f"--scaling-gpus must be whole numbers >= 1 (e.g. 1 2 4 8), got {n!r}")
    args.scaling_gpus = [int(n) for n in gpus]
