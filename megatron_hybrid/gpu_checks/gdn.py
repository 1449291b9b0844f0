"""GPU check of the GDN layer: fla vs the PyTorch path at the 7B GDN shape, plus the Hopper self-check.

    MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=1 python tools/gpu_check.py gdn --seq-length 8192

Builds one Olmo Hybrid GDN layer (pre-norm mixer + SwiGLU MLP) at the 7B widths (d 3840, H = HV = 30,
Dk 96, Dv 192, FFN 11008) in bf16 on one GPU, runs forward+backward with ``kernel_backend=fla`` and
with ``kernel_backend=torch`` on the same weights and input, and prints the median times (CUDA events,
after warm-up: fla autotunes each new shape once), their ratio, and the norm-wise relative difference of
the output and the input gradient. Also runs the mixer alone. Prints the Hopper guard's self-check
result (``runtime/hopper_guard.py``) and, optionally, writes a JSON report (``--json``) and the table
(``--out``: ``OUT/gdn.md``). ``--dry-run`` prints the cases without a GPU.

Shapes: x and the output gradient are [S, B, D] (S sequence, B micro-batch, D hidden width).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from megatron_hybrid.gpu_checks.runner import env, finish, whole

#: the run matrix: each (backend, part) is timed; ``part`` is the whole layer or its mixer alone
BACKENDS = ("fla", "torch")
PARTS = ("layer", "mixer")
CASES = [(backend, part) for backend in BACKENDS for part in PARTS]


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(prog="gpu_check.py gdn", description=__doc__.split("\n")[0])
    p.add_argument("--seq-length", type=whole(1), default=8192)
    p.add_argument("--micro-batch-size", type=whole(1), default=1)
    p.add_argument("--iters", type=whole(1), default=10, help="timed iterations (median)")
    p.add_argument("--warmup", type=whole(0), default=2, help="untimed iterations first")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--out", default=env("OUT"), help="write the table to OUT/gdn.md [$OUT]")
    p.add_argument("--dry-run", action="store_true", help="print the cases, run nothing")
    return p.parse_args(argv)


def _rel(a, b) -> float:
    """Norm-wise relative difference |a - b| / |b| in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _time(fn, iters, warmup):
    """Median milliseconds of ``fn`` over ``iters`` calls after ``warmup`` (CUDA events)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def format_table(results: dict) -> str:
    """The markdown table of the two parts (times in ms, speed-up torch / fla, relative diffs)."""
    head = (f"GDN at the 7B shape (B={results['micro_batch_size']}, T={results['seq_length']}, "
            f"d=3840, H=HV=30, Dk=96, Dv=192), bf16, {results.get('gpu')}, torch "
            f"{results.get('torch')}, triton {results.get('triton')}\n\n")
    rows = ["| part | fla ms | torch ms | speedup | out rel | dx rel |", "|---|---|---|---|---|---|"]
    for part in ("mixer", "layer"):
        rows.append(f"| {part} | {results[f'{part}_fla_ms']:.2f} | {results[f'{part}_torch_ms']:.2f} | "
                    f"{results[f'{part}_speedup_fla_vs_torch']:.2f} | "
                    f"{results[f'{part}_out_rel_diff']:.2e} | {results[f'{part}_dx_rel_diff']:.2e} |")
    return head + "\n".join(rows)


def _build_layers(cfg, torch):
    """One GDN layer per backend, the torch one loaded with the fla one's weights."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_hybrid.layers.layer_specs import gdn_layer_spec

    layers = {}
    for backend in BACKENDS:
        tc = cfg.to_transformer_config(1, 1, params_dtype=torch.bfloat16, bf16=True,
                                       kernel_backend=backend)
        torch.manual_seed(0)
        layers[backend] = build_module(gdn_layer_spec(), config=tc, layer_number=1).cuda()
    layers["torch"].load_state_dict(layers["fla"].state_dict())
    return layers


def measure(args, results: dict) -> None:
    """Time every case and compare the backends; fills ``results``."""
    import torch

    from megatron_hybrid.config import preset_config

    cfg = preset_config("olmo_hybrid_7b")
    S, B, D = args.seq_length, args.micro_batch_size, cfg.hidden_size
    layers = _build_layers(cfg, torch)
    torch.manual_seed(1)
    x = torch.randn(S, B, D, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(S, B, D, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for name, part in CASES:
        layer = layers[name]
        mod = layer.self_attention if part == "mixer" else layer
        xi = x.clone().requires_grad_(True)

        def step(mod=mod, xi=xi, part=part):
            xi.grad = None
            for p in mod.parameters():
                p.grad = None
            out = mod(xi, attention_mask=None)[0] if part == "mixer" else mod(xi)[0]
            out.backward(gy)
            return out

        t0 = time.time()
        out = step()  # first call: fla compiles / autotunes this shape
        torch.cuda.synchronize()
        first = time.time() - t0
        results[f"{part}_{name}_ms"] = _time(step, args.iters, args.warmup)
        results[f"{part}_{name}_first_call_s"] = first
        outs[(name, part)] = (out.detach(), xi.grad.detach().clone())
    for part in PARTS:
        (of, gf), (ot, gt) = outs[("fla", part)], outs[("torch", part)]
        results[f"{part}_out_rel_diff"] = _rel(of, ot)
        results[f"{part}_dx_rel_diff"] = _rel(gf, gt)
        results[f"{part}_speedup_fla_vs_torch"] = results[f"{part}_torch_ms"] / results[f"{part}_fla_ms"]
    results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30


def main(argv=None) -> int:
    """Entry point: 0 after printing the table, 1 without a CUDA GPU."""
    args = parse_args(argv)
    if args.dry_run:
        print(f"GDN check, 7B shape, bf16, T={args.seq_length}, B={args.micro_batch_size}: "
              f"{args.iters} timed iterations after {args.warmup} warm-up ones per case")
        for backend, part in CASES:
            print(f"  {part:6s} kernel_backend={backend}")
        return 0
    import torch

    from megatron_hybrid.parallel import initialize_distributed
    from megatron_hybrid.runtime.hopper_guard import hopper_selfcheck_result

    if not torch.cuda.is_available():
        print("error: gpu_check.py gdn needs a CUDA GPU (--dry-run shows the cases)", file=sys.stderr)
        return 1
    initialize_distributed(1, 1)
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        pass
    measure(args, results)
    results["hopper_selfcheck"] = hopper_selfcheck_result()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    print(json.dumps(results.get("hopper_selfcheck"), indent=1, default=str))
    finish(format_table(results), os.path.join(args.out, "gdn.md") if args.out else None)
    return 0
