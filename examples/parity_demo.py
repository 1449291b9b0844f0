#!/usr/bin/env python3
"""Parity demo: a tiny random Olmo Hybrid in HF format -> Megatron (TP=2, PP=2) -> logits vs transformers.

Runs the project's own tools the way a user would: ``tools/convert_hf_to_megatron.py`` and
``torchrun tools/dump_logits.py`` (4 CPU processes over gloo, or the GPUs present), then compares
the fp32 logits with HF ``OlmoHybridForCausalLM`` on the same weights. No download.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def main():
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        sys.modules["fla"] = None  # transformers' pure-torch GDN on CPU
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    work = tempfile.mkdtemp(prefix="mh_parity_")
    cfg = OlmoHybridConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=4, linear_num_key_heads=4,
        linear_num_value_heads=4, linear_key_head_dim=24, linear_value_head_dim=48,
        max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    torch.manual_seed(0)
    hf = OlmoHybridForCausalLM(cfg).eval()
    hf_dir = os.path.join(work, "hf")
    hf.save_pretrained(hf_dir)
    print(f"[demo] tiny Olmo Hybrid ({cfg.num_hidden_layers} layers, {cfg.layer_types.count('linear_attention')} GDN + "
          f"{cfg.layer_types.count('full_attention')} attention) saved to {hf_dir}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    ckpt = os.path.join(work, "megatron")
    ngpu = torch.cuda.device_count()
    tp, pp = (2, 2) if ngpu in (0, 4) or ngpu >= 4 else (1, ngpu)
    nproc = tp * pp
    subprocess.run([sys.executable, os.path.join(ROOT, "tools/convert_hf_to_megatron.py"), "--hf-path", hf_dir,
                    "--save", ckpt, "--target-tensor-parallel-size", str(tp),
                    "--target-pipeline-parallel-size", str(pp)], check=True, env=env)
    ids = torch.randint(0, cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    np.save(os.path.join(work, "ids.npy"), ids.numpy())
    out = os.path.join(work, "logits.npy")
    print(f"[demo] torchrun --nproc-per-node {nproc} tools/dump_logits.py (TP={tp}, PP={pp})", flush=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                    "--master-port", os.environ.get("MASTER_PORT", "29517"),
                    os.path.join(ROOT, "tools/dump_logits.py"), "--load", ckpt, "--input-ids",
                    os.path.join(work, "ids.npy"), "--output", out], check=True, env=env)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float().numpy()
    got = np.load(out)
    err = float(np.abs(got - ref).max())
    print(f"[demo] logits {got.shape}: max |Megatron(TP={tp},PP={pp}) - transformers| = {err:.2e} "
          f"(tolerance 1e-4)")
    print(f"[demo] files under {work}")
    return 0 if err <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
