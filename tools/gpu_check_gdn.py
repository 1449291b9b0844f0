#!/usr/bin/env python3
"""GPU check of the GDN layer: fla vs the PyTorch path at the 7B GDN shape, plus the Hopper self-check.

    MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK=1 python tools/gpu_check_gdn.py --seq-length 8192

Builds one Olmo Hybrid GDN layer (pre-norm mixer + SwiGLU MLP) at the 7B widths (d 3840, H = HV = 30,
Dk 96, Dv 192, FFN 11008) in bf16 on one GPU, runs forward+backward with ``kernel_backend=fla`` and
with ``kernel_backend=torch`` on the same weights and input, and prints the median times (CUDA events,
after warm-up: fla autotunes each new shape once), their ratio, and the norm-wise relative difference of
the output and the input gradient. Also runs the mixer alone. Prints the Hopper guard's self-check
result (``runtime/hopper_guard.py``) and, optionally, writes a JSON report.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _time(fn, iters, warmup):
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


def main(argv=None):
    args = parse_args(argv)
    import torch
    from megatron.core.transformer.spec_utils import build_module

    from megatron_hybrid.config import preset_config
    from megatron_hybrid.layers.layer_specs import gdn_layer_spec
    from megatron_hybrid.parallel import initialize_distributed
    from megatron_hybrid.runtime.hopper_guard import hopper_selfcheck_result

    if not torch.cuda.is_available():
        print("error: tools/gpu_check_gdn.py needs a CUDA GPU", file=sys.stderr)
        return 1
    initialize_distributed(1, 1)
    cfg = preset_config("olmo_hybrid_7b")
    S, B, D = args.seq_length, args.micro_batch_size, cfg.hidden_size
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "seq_length": S, "micro_batch_size": B}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        pass
    layers = {}
    for backend in ("fla", "torch"):
        tc = cfg.to_transformer_config(1, 1, params_dtype=torch.bfloat16, bf16=True,
                                       kernel_backend=backend)
        torch.manual_seed(0)
        layer = build_module(gdn_layer_spec(), config=tc, layer_number=1).cuda()
        layers[backend] = layer
    layers["torch"].load_state_dict(layers["fla"].state_dict())
    torch.manual_seed(1)
    x = torch.randn(S, B, D, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(S, B, D, device="cuda", dtype=torch.bfloat16)

    outs = {}
    for name, layer in layers.items():
        for part, mod in (("layer", layer), ("mixer", layer.self_attention)):
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
            ms = _time(step, args.iters, args.warmup)
            outs[(name, part)] = (out.detach(), xi.grad.detach().clone())
            results[f"{part}_{name}_ms"] = ms
            results[f"{part}_{name}_first_call_s"] = first
    for part in ("layer", "mixer"):
        (of, gf), (ot, gt) = outs[("fla", part)], outs[("torch", part)]
        results[f"{part}_out_rel_diff"] = _rel(of, ot)
        results[f"{part}_dx_rel_diff"] = _rel(gf, gt)
        results[f"{part}_speedup_fla_vs_torch"] = results[f"{part}_torch_ms"] / results[f"{part}_fla_ms"]
    results["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results["hopper_selfcheck"] = hopper_selfcheck_result()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    print(json.dumps(results.get("hopper_selfcheck"), indent=1, default=str))
    print(f"\nGDN at the 7B shape (B={B}, T={S}, d=3840, H=HV=30, Dk=96, Dv=192), bf16, "
          f"{results['gpu']}, torch {results['torch']}, triton {results.get('triton')}")
    print(f"{'part':8s} {'fla ms':>9s} {'torch ms':>9s} {'speedup':>8s} {'out rel':>9s} {'dx rel':>9s}")
    for part in ("mixer", "layer"):
        print(f"{part:8s} {results[f'{part}_fla_ms']:9.2f} {results[f'{part}_torch_ms']:9.2f} "
              f"{results[f'{part}_speedup_fla_vs_torch']:8.2f} {results[f'{part}_out_rel_diff']:9.2e} "
              f"{results[f'{part}_dx_rel_diff']:9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
