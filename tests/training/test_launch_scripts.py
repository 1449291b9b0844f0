"""The launch scripts: shell syntax, and the 7B script's --dry-run layout checks."""
from __future__ import annotations

import glob
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "examples", "*.sh"))
                 + glob.glob(os.path.join(REPO, "examples", "slurm", "*.sbatch"))
                 + glob.glob(os.path.join(REPO, "tools", "*.sh")))


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shell_syntax(script):
    subprocess.run(["bash", "-n", script], check=True)


def _dry_run(**env):
    full = dict(os.environ, PYTHONWARNINGS="ignore", **{k: str(v) for k, v in env.items()})
    full.pop("DATA_PATH", None)
    full.pop("TOKENIZER_MODEL", None)
    return subprocess.run(["bash", "examples/train_olmo_hybrid_7b.sh", "--dry-run"], cwd=REPO,
                          env=full, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_7b_dry_run_resolves_and_checks_layout():
    ok = _dry_run(NNODES=8, GPUS_PER_NODE=8, TP=2)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "--nnodes 8" in ok.stdout and "--tensor-model-parallel-size 2" in ok.stdout
    assert "dry run OK: 64 ranks = TP 2 x PP 1 x CP 1 x DP 32" in ok.stdout
    assert "44.2 GFLOP/token" in ok.stdout
    bad = _dry_run(NNODES=8, GPUS_PER_NODE=8, TP=4)
    assert bad.returncode == 2
    assert "--tensor-model-parallel-size 4 does not divide --num-attention-heads = 30" in bad.stderr
    assert "allowed values for this model: [1, 2]" in bad.stderr
