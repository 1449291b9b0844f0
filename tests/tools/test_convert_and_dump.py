"""End to end from the outside: HF dir -> tools/convert_hf_to_megatron.py -> torchrun
tools/dump_logits.py at TP=2 x PP=2 (and TP=1) -> logits equal transformers'."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.hf_models import hf_logits, make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONWARNINGS": "ignore"}


def _run(args, **kw):
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tied")
    model, _ = make_hf_model("tied")
    model.save_pretrained(str(d), save_original_format=False)
    return d, model


@pytest.mark.slow
@pytest.mark.distributed
def test_convert_then_dump_logits_tp2_pp2_and_tp1(hf_dir, tmp_path):
    d, model = hf_dir
    ckpt = tmp_path / "ckpt"
    r = _run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-path", str(d), "--save",
              str(ckpt), "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert (ckpt / "iter_0000000" / "run_config.yaml").is_file()
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "ids.npy", ids.numpy())
    ref = hf_logits(model, ids).numpy()
    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
              "--master-port", "29533", "tools/dump_logits.py", "--load", str(ckpt),
              "--input-ids", str(tmp_path / "ids.npy"), "--output", str(tmp_path / "l4.npy")])
    assert r.returncode == 0, r.stderr[-3000:]
    r1 = _run([sys.executable, "tools/dump_logits.py", "--load", str(ckpt), "--input-ids",
               str(tmp_path / "ids.npy"), "--output", str(tmp_path / "l1.npy")])
    assert r1.returncode == 0, r1.stderr[-3000:]
    for name in ("l4.npy", "l1.npy"):
        got = np.load(tmp_path / name)
        assert got.shape == ref.shape and got.dtype == np.float32
        err = float(np.abs(got - ref).max())
        print(f"[tools] {name}: max |dlogits| vs transformers = {err:.3e}")
        assert err <= 1e-5


def test_convert_refuses_tp_that_does_not_divide(hf_dir, tmp_path):
    d, _ = hf_dir
    r = _run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-path", str(d), "--save",
              str(tmp_path / "x"), "--target-tensor-parallel-size", "3"])
    assert r.returncode == 1
    assert "--tensor-model-parallel-size 3 does not divide" in r.stderr
    assert not (tmp_path / "x").exists()


def test_convert_names_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text(make_hf_model("base")[1].to_json_string())
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}')
    r = _run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-path", str(tmp_path),
              "--save", str(tmp_path / "out")])
    assert r.returncode == 1 and "model-00001-of-00002.safetensors" in r.stderr
