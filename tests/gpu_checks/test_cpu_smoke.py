"""The GPU checks' CPU smoke modes end to end (gloo, tiny preset): the feature check on two rows
(the embedded corpus built beside them, the logs packed) and the multi-GPU check on two layouts,
the checkpoint resumed at TP1 and the tiny scaling run. Their tables come last and are written."""
from __future__ import annotations

import contextlib
import io
import os
import tarfile

import pytest

from megatron_hybrid.gpu_checks import features, multi_gpu
from megatron_hybrid.gpu_checks.runner import ROOT

# PYTHONPATH: the launched tools import this checkout's package, wherever it is installed from
ENV = {"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
       "PYTHONPATH": ROOT}


def _run(fn, argv, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = fn(argv)
    print(buf.getvalue()[-4000:])
    return rc, buf.getvalue()


@pytest.mark.slow
@pytest.mark.distributed
def test_feature_check_cpu_smoke_two_rows(tmp_path, monkeypatch):
    out, work = tmp_path / "out", tmp_path / "work"
    rc, text = _run(features.main, ["--cpu", "--out", str(out), "--work", str(work), "--rows", "2,15",
                                    "--pack-logs", "--budget-s", "400"], monkeypatch)
    assert rc == 0, text
    table = text.rsplit("\n\n", 1)[1].splitlines()
    assert [ln.split(" | ")[1] for ln in table[2:]] == ["yes", "yes"]
    assert table[2].startswith("| embedded corpus (baseline) |") and table[3].startswith("| dry run |")
    assert (out / "features.md").read_text().count("| yes |") == 2
    assert not (out / "logs").exists()
    with tarfile.open(out / "feature_logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/00_corpus.log" in names and "logs/01_embedded_corpus_baseline.log" in names


@pytest.mark.slow
@pytest.mark.distributed
def test_multi_gpu_check_cpu_smoke(tmp_path, monkeypatch):
    out = tmp_path / "out"
    rc, text = _run(multi_gpu.main, ["--cpu-smoke", "--out", str(out), "--layouts", "ref", "tp2_sp",
                                     "--data-dir", str(tmp_path / "data"), "--work-dir", str(tmp_path)],
                    monkeypatch)
    assert rc == 0, text
    md = (out / "multi_gpu.md").read_text()
    assert md.strip() in text  # the tables are what it prints last
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and "---" not in ln]
    corr = [r for r in rows if r.startswith(("| ref:", "| tp2_sp:", "| resume_tp1:"))]
    assert len(corr) == 4  # ref, tp2_sp vs ref, the resume vs tp2_sp and vs ref
    assert all("PASS" in r.upper() or "reference: lm loss" in r for r in corr), corr
    assert any(r.startswith("| tiny, seq 256 | 1 |") for r in rows)
    assert not [d for d in os.listdir(tmp_path) if d.startswith("gpu_check_multi_gpu.")]  # work removed
