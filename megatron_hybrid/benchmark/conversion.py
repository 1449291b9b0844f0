"""Benchmark both checkpoint conversions at the real Olmo Hybrid 7B widths on the CPU.

    python tools/bench_conversion.py --num-layers 4 --work-dir /tmp/bench_conv

Writes a random bf16 HF ``olmo_hybrid`` directory with the 7B widths (spec ``docs/model.md``
§6: d 3840, 30 heads, GDN 30 x 96 / 192, FFN 11008, vocabulary 100352, NoPE) and
``--num-layers`` layers (pattern G-G-G-*), in the released layout and sharded at 5 GB. Then runs
``tools/convert_hf_to_megatron.py`` and ``tools/convert_megatron_to_hf.py --skip-validation`` as
separate processes (each reports its own time and peak RSS), checks that every tensor came back
bit-identical, and prints a table with the ratio of peak RSS to the model's size and an
extrapolation to 32 layers: the import holds the whole model (peak = measured + the extra
layers' bytes); the export holds at most one shard (5 GB) plus its serialised copy and one
layer (peak = measured - 2 min(size, 5 GB) + 2 min(size at 32 layers, 5 GB)).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

#: the repository root: the converters run as ``tools/convert_*.py`` from here, as a user runs them
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WIDTHS = dict(hidden_size=3840, intermediate_size=11008, num_attention_heads=30,
              num_key_value_heads=30, linear_num_key_heads=30, linear_num_value_heads=30,
              linear_key_head_dim=96, linear_value_head_dim=192, vocab_size=100352)


def hf_config(num_layers: int) -> dict:
    """config.json of the benchmark model (7B widths, ``num_layers`` layers, NoPE)."""
    types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(num_layers)]
    return {"architectures": ["OlmoHybridForCausalLM"], "model_type": "olmo_hybrid",
            "num_hidden_layers": num_layers, "layer_types": types, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "linear_conv_kernel_dim": 4,
            "linear_allow_neg_eigval": True, "max_position_embeddings": 65536,
            "rope_parameters": {"rope_theta": None}, "eos_token_id": 100257,
            "pad_token_id": 100277, "bos_token_id": None, **WIDTHS}


def layer_shapes(kind: str) -> dict:
    """Released tensor names (after ``model.layers.{i}.``) and shapes of one layer."""
    from megatron_hybrid.config.gdn_projection import HF_CONV_NAMES, HF_IN_PROJ_NAMES, GdnProjectionLayout

    d, f = WIDTHS["hidden_size"], WIDTHS["intermediate_size"]
    mlp = {"mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
           "mlp.down_proj.weight": (d, f), "post_attention_layernorm.weight": (d,)}
    if kind == "linear_attention":
        lay = GdnProjectionLayout.from_config(argparse.Namespace(**WIDTHS))
        h, dv = lay.num_value_heads, lay.value_head_dim
        proj = {f"linear_attn.{n}.weight": (rows, d)
                for n, rows in zip(HF_IN_PROJ_NAMES, lay.in_proj_sizes(), strict=True)}
        conv = {f"linear_attn.{n}.weight": (ch, 1, 4)
                for n, ch in zip(HF_CONV_NAMES, lay.conv_sizes(), strict=True)}
        return {**mlp, "input_layernorm.weight": (d,), **proj, **conv, "linear_attn.A_log": (h,),
                "linear_attn.dt_bias": (h,), "linear_attn.o_norm.weight": (dv,),
                "linear_attn.o_proj.weight": (d, lay.value_dim)}
    return {**mlp, "self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (d, d),
            "self_attn.v_proj.weight": (d, d), "self_attn.o_proj.weight": (d, d),
            "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
            "post_feedforward_layernorm.weight": (d,)}


def model_bytes(num_layers: int) -> int:
    """bf16 bytes of the model with ``num_layers`` layers."""
    n = 2 * 100352 * 3840 + 3840
    for i in range(num_layers):
        kind = "full_attention" if i % 4 == 3 else "linear_attention"
        for shape in layer_shapes(kind).values():
            size = 1
            for s in shape:
                size *= s
            n += size
    return 2 * n


def write_random_hf(directory: str, num_layers: int) -> None:
    """A random bf16 HF directory (released names, 5 GB shards), written layer by layer."""
    import json

    import torch

    from megatron_hybrid.hf.safetensors_writer import ShardedSafetensorsWriter

    os.makedirs(directory)
    g = torch.Generator().manual_seed(0)
    writer = ShardedSafetensorsWriter(directory, 5 * 10 ** 9)
    cfg = hf_config(num_layers)
    for i, kind in enumerate(cfg["layer_types"]):
        for name, shape in layer_shapes(kind).items():
            writer.add(f"model.layers.{i}.{name}",
                       (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16))
    for name, shape in (("model.embed_tokens.weight", (100352, 3840)), ("model.norm.weight",
                        (3840,)), ("lm_head.weight", (100352, 3840))):
        writer.add(name, (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16))
    writer.finish()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def run_tool(args) -> tuple:
    """Run a converter; return (wall seconds, peak RSS GB as the tool reported it)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    start = time.time()
    r = subprocess.run([sys.executable, *args, "--no-progress"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    wall = time.time() - start
    if r.returncode != 0:
        sys.exit(f"{args[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    m = re.search(r"peak RSS ([\d.]+) GB", r.stdout)
    print(r.stdout.strip().splitlines()[-1], flush=True)
    return wall, float(m.group(1))


def compare_dirs(a: str, b: str) -> int:
    """Number of tensors compared; exits when names, dtypes or bits differ."""
    import torch
    from safetensors import safe_open

    from megatron_hybrid.hf.io import safetensors_files

    fa, fb = safetensors_files(a), safetensors_files(b)
    if set(fa) != set(fb):
        sys.exit(f"tensor names differ: {sorted(set(fa) ^ set(fb))[:8]}")
    for name in sorted(fa):
        with safe_open(fa[name], "pt") as x, safe_open(fb[name], "pt") as y:
            ta, tb = x.get_tensor(name), y.get_tensor(name)
            if ta.dtype != tb.dtype or not torch.equal(ta, tb):
                sys.exit(f"tensor {name} differs after the round trip")
    return len(fa)


def main(argv=None) -> int:
    """Entry point: build, convert both ways, compare, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--work-dir", default="runs/bench_conversion")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    work = os.path.abspath(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    src, ckpt, out = (os.path.join(work, n) for n in ("hf_in", "megatron", "hf_out"))
    size, size32 = model_bytes(args.num_layers) / 1e9, model_bytes(32) / 1e9
    t0 = time.time()
    write_random_hf(src, args.num_layers)
    print(f"[bench] random {args.num_layers}-layer 7B-width model: {size:.2f} GB bf16 "
          f"({time.time() - t0:.0f} s to write)", flush=True)
    t_in, rss_in = run_tool(["tools/convert_hf_to_megatron.py", "--hf-path", src, "--save",
                             ckpt, "--target-tensor-parallel-size", "2"])
    t_out, rss_out = run_tool(["tools/convert_megatron_to_hf.py", "--load", ckpt, "--save", out,
                               "--skip-validation"])
    n = compare_dirs(src, out)
    print(f"[bench] HF -> Megatron -> HF: {n} tensors bit-identical", flush=True)
    grow = size32 - size
    print(f"\n| direction | time (s) | peak RSS (GB) | peak / model size | 32 layers: time (s), "
          f"peak RSS (GB), peak / size ({size32:.1f} GB) |\n|---|---|---|---|---|")
    shard_growth = 2 * (min(size32, 5.0) - min(size, 5.0))
    for name, t, rss, peak32 in (("HF -> Megatron", t_in, rss_in, rss_in + grow),
                                 ("Megatron -> HF", t_out, rss_out, rss_out + shard_growth)):
        print(f"| {name} | {t:.0f} | {rss:.2f} | {rss / size:.2f} | {t * size32 / size:.0f}, "
              f"{peak32:.1f}, {peak32 / size32:.2f} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0
