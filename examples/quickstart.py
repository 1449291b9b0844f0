#!/usr/bin/env python3
"""Quickstart driver (run by ``examples/quickstart.sh``): pretrain a tiny Olmo Hybrid end to end.

1. Builds the embedded default (``docs/design.md`` §8): English text from this Python's standard
   library, a SentencePiece BPE tokenizer trained on it, preprocessed to ``.bin/.idx``.
2. Trains the ``tiny`` preset with ``torchrun pretrain_olmo_hybrid.py``: TP=2 x PP=2 as 4 gloo
   processes on CPU, or TP=1 x PP=1 on one GPU (data parallel over the GPUs present).
   The first launch stops after saving at the half-way checkpoint (``--exit-interval``); the
   same command launched again resumes from it and finishes.
3. Prints the loss curve, the checkpoints and where the TensorBoard logs are.

Environment: ``QUICKSTART_DIR`` (default ``runs/quickstart``; cleared first), ``QUICKSTART_ITERS``
(default 100 on CPU, 300 on GPU), ``DATA_DIR`` (default ``data/embedded``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([-+0-9.Ee]+) \|")


def _layout():
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        return dict(nproc=4, tp=2, pp=2, iters=100, seq=256, mbs=4, gbs=16, extra=[
            "--sequence-parallel", "--num-workers", "0"], where="4 CPU processes (gloo)")
    return dict(nproc=gpus, tp=1, pp=1, iters=300, seq=1024, mbs=8, gbs=8 * gpus, extra=[
        "--bf16", "--num-workers", "2"], where=f"{gpus} GPU(s) (NCCL)")


def _choose_kernels(env) -> None:
    """On Hopper with an fla-refused Triton and no opt-in, run the GDN on the PyTorch kernels."""
    if env.get("MEGATRON_HYBRID_KERNELS"):
        return
    from megatron_hybrid.runtime.hopper_guard import fla_backward_refused_here

    if fla_backward_refused_here():
        env["MEGATRON_HYBRID_KERNELS"] = "torch"
        print("[quickstart] this Hopper GPU's Triton (< 3.7.1) makes fla refuse the GDN backward: "
              "using the PyTorch kernels. Install Triton >= 3.7.1, or opt in to a gradient "
              "self-check with MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=1, to use fla.", flush=True)


def _run(cmd, log_path, env) -> None:
    print("[quickstart] $ " + " ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT, env=env)
        for line in proc.stdout:
            log.write(line)
            if "iteration" in line or "loss at" in line or " > " in line or "Error" in line:
                sys.stdout.write(line)
                sys.stdout.flush()
        if proc.wait() != 0:
            sys.exit(f"[quickstart] training failed (exit {proc.returncode}); full log: {log_path}")


def _curve(log_paths):
    points = {}
    for path in log_paths:
        for line in open(path):
            m = LINE.search(line)
            if m:
                points[int(m.group(1))] = float(m.group(2))
    return sorted(points.items())


def _print_curve(points) -> None:
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    print("\n[quickstart] loss curve (lm loss per logged iteration)")
    for it, v in points:
        bar = "#" * (1 + int(50 * (v - lo) / max(hi - lo, 1e-9)))
        print(f"  {it:5d}  {v:7.4f}  {bar}")


def main() -> int:
    t0 = time.time()
    from megatron_hybrid.data.embedded import build_embedded_default

    out = os.path.abspath(os.environ.get("QUICKSTART_DIR", os.path.join(ROOT, "runs",
                                                                         "quickstart")))
    data_dir = os.path.abspath(os.environ.get("DATA_DIR", os.path.join(ROOT, "data", "embedded")))
    print(f"[quickstart] building the embedded default corpus in {data_dir} (no download)")
    data = build_embedded_default(data_dir)
    print(f"[quickstart] corpus: {data.num_documents} documents, {data.num_tokens:,} tokens, "
          f"SentencePiece BPE vocabulary {data.vocab_size}")

    lay = _layout()
    iters = int(os.environ.get("QUICKSTART_ITERS", lay["iters"]))
    half = max(1, iters // 2)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    ckpt, tb = os.path.join(out, "checkpoints"), os.path.join(out, "tensorboard")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TORCHDYNAMO_DISABLE=os.environ.get("TORCHDYNAMO_DISABLE", "1"),
               CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONWARNINGS="ignore")
    _choose_kernels(env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={lay['nproc']}", "pretrain_olmo_hybrid.py",
           "--model-preset", "tiny",
           "--tensor-model-parallel-size", str(lay["tp"]),
           "--pipeline-model-parallel-size", str(lay["pp"]),
           "--seq-length", str(lay["seq"]), "--micro-batch-size", str(lay["mbs"]),
           "--global-batch-size", str(lay["gbs"]), "--train-iters", str(iters),
           "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
           "--lr-warmup-iters", str(max(1, iters // 20)), "--weight-decay", "0.1",
           "--clip-grad", "1.0", "--use-distributed-optimizer",
           "--data-path", data.data_prefix, "--split", "98,2,0",
           "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
           data.tokenizer_model, "--log-interval", "5", "--eval-interval", str(half),
           "--eval-iters", "2", "--save", ckpt, "--load", ckpt, "--save-interval", str(half),
           "--tensorboard-dir", tb] + lay["extra"]
    print(f"[quickstart] training the tiny preset on {lay['where']}: TP={lay['tp']}, "
          f"PP={lay['pp']}, {iters} iterations; stopping after the checkpoint at {half}")
    logs = [os.path.join(out, "train_part1.log"), os.path.join(out, "train_part2.log")]
    _run(cmd + ["--exit-interval", str(half)], logs[0], env)
    print(f"\n[quickstart] relaunching the same command: it resumes from iteration {half}")
    _run(cmd, logs[1], env)

    points = _curve(logs)
    _print_curve(points)
    first, last = points[0][1], points[-1][1]
    ckpts = sorted(d for d in os.listdir(ckpt) if d.startswith("iter_"))
    print(f"\n[quickstart] lm loss {first:.3f} -> {last:.3f} (fell {first - last:.2f} nats)")
    print(f"[quickstart] checkpoints: {', '.join(ckpts)} in {ckpt}")
    print(f"[quickstart] TensorBoard: tensorboard --logdir {tb}")
    print(f"[quickstart] logs: {logs[0]}, {logs[1]}; total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
