"""A trained checkpoint (TP=2 x PP=2, distributed optimizer, as the quickstart) -> HF with
``tools/convert_megatron_to_hf.py`` (its logit validation on; started in the repository root and
in another directory) -> transformers: ``generate()``
runs and its logits equal ``tools/dump_logits.py`` on the Megatron checkpoint at TP=2 x PP=2."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.dist import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def _dump_worker(rank, load, ids_path, out_path):
    from megatron_hybrid.checkpoint import dump_logits as mod

    mod.dump(SimpleNamespace(load=load, iteration=None, input_ids=ids_path, output=out_path,
                             tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                             micro_batch_size=None))
    return True


@pytest.mark.slow
@pytest.mark.distributed
def test_trained_checkpoint_to_hf_generates_and_matches_dump_logits(checkpoint_at_5, tmp_path):
    from megatron_hybrid.hf.validate import hide_fla_on_cpu

    ckpt, _ = checkpoint_at_5
    hf_dir = tmp_path / "hf"
    r = subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--load", ckpt,
                        "--save", str(hf_dir), "--no-progress"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[validate] Megatron vs transformers" in r.stdout and ": OK" in r.stdout, r.stdout
    assert (hf_dir / "tokenizer.model").is_file()  # the run's SentencePiece model, copied
    # the same tool started from another directory (installed package, no sys.path edits): same files
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_megatron_to_hf.py"),
                        "--load", os.path.abspath(ckpt), "--save", "hf2", "--no-progress"],
                       cwd=elsewhere, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[validate] Megatron vs transformers" in r.stdout and ": OK" in r.stdout, r.stdout
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        assert (elsewhere / "hf2" / name).read_bytes() == (hf_dir / name).read_bytes(), name

    import json

    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(7))
    np.save(tmp_path / "ids.npy", ids.numpy())
    run_distributed(_dump_worker, 4, ckpt, str(tmp_path / "ids.npy"),
                    str(tmp_path / "mg.npy"), tp=2, pp=2, timeout=300)
    megatron = torch.from_numpy(np.load(tmp_path / "mg.npy"))

    hide_fla_on_cpu()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(input_ids=ids).logits.float()
        out = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    err = float((hf - megatron).abs().max())
    print(f"[export] trained TP2xPP2 checkpoint: max |dlogits| transformers vs dump_logits "
          f"= {err:.3e}; generate() -> {out.shape[1] - 8} new tokens")
    assert hf.shape == megatron.shape and err <= 1e-4
    assert out.shape == (1, 14) and torch.equal(out[0, :8], ids[0, :8])
    # greedy decoding follows the logits: the first new token is the argmax after the prompt
    assert int(out[0, 8]) == int(hf[0, 7].argmax())
