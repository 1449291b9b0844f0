"""Decision logic of the fla Hopper guard policy, with fake capability / Triton / self-check results."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from megatron_hybrid.runtime import hopper_guard as hg
from megatron_hybrid.runtime.hopper_guard import hopper_selfcheck_result


@pytest.mark.parametrize("version,affected", [
    ("3.3.1", False), ("3.4.0", True), ("3.5.1", True), ("3.6.0", True), ("3.6.0+git1234", True),
    ("3.7.0", True), ("3.7.1", False), ("3.8.0", False), ("4.0.0", False),
])
def test_triton_range(version, affected):
    assert hg.triton_in_affected_range(version) is affected


def test_guard_would_fire():
    fire = hg.fla_guard_would_fire
    assert fire(is_hopper=True, triton_version="3.6.0")
    assert not fire(is_hopper=False, triton_version="3.6.0")  # e.g. A100, B200
    assert not fire(is_hopper=True, triton_version="3.7.1")
    assert not fire(is_hopper=True, triton_version="3.3.0")
    assert not fire(is_hopper=True, triton_version="3.6.0", tilelang_usable=True)
    assert not fire(is_hopper=True, triton_version="3.6.0", flag_above_3_7_1=True)  # lifted by the user


def test_guard_decision_table():
    d = hg.guard_decision
    assert d(guard_fires=False, opt_in=False, selfcheck_passed=None) == "allow"
    assert d(guard_fires=False, opt_in=True, selfcheck_passed=False) == "allow"
    assert d(guard_fires=True, opt_in=False, selfcheck_passed=None) == "refuse"
    assert d(guard_fires=True, opt_in=False, selfcheck_passed=True) == "refuse"
    assert d(guard_fires=True, opt_in=True, selfcheck_passed=None) == "selfcheck"
    assert d(guard_fires=True, opt_in=True, selfcheck_passed=True) == "allow"
    assert d(guard_fires=True, opt_in=True, selfcheck_passed=False) == "refuse_failed"


def test_selfcheck_thresholds():
    ok = {"o": 5e-3, "dq": 5e-3, "dk": 6e-3, "dv": 4e-3, "dg": 5e-3, "dbeta": 5e-3, "dh0": 3e-3}
    assert hg.selfcheck_passed({"bfloat16": ok, "float32": {k: 2e-3 for k in ok}})
    assert not hg.selfcheck_passed({"bfloat16": ok, "float32": {**ok, "dg": 1.5e-2}})  # fp32 tol 1e-2
    assert hg.selfcheck_passed({"bfloat16": {**ok, "dg": 1.5e-2}})  # bf16 tol 2e-2
    assert not hg.selfcheck_passed({"bfloat16": {**ok, "dk": 2.1e-2}})
    assert not hg.selfcheck_passed({"bfloat16": {**ok, "dk": math.nan}})
    assert not hg.selfcheck_passed({"bfloat16": {}})


@pytest.fixture
def fake_gpu(monkeypatch):
    """A fake machine: fla's guard flag in a dict, fake guard info, a scripted self-check."""
    hg._reset_state_for_tests()
    state = {"flag": False, "calls": [], "errors": 5e-3,
             "info": {"is_hopper": True, "triton_version": "3.6.0", "tilelang_usable": False,
                      "flag_above_3_7_1": False}}
    monkeypatch.setattr(hg, "_get_fla_flag", lambda: state["flag"])
    monkeypatch.setattr(hg, "_set_fla_flag", lambda v: state.__setitem__("flag", v))
    monkeypatch.setattr(hg, "_fla_guard_info", lambda: state["info"])

    def selfcheck(K, V, device, dtypes=("bfloat16", "float32"), **kw):
        state["calls"].append((K, V, tuple(dtypes)))
        state["heads"] = (kw.get("H"), kw.get("HV"))
        with hg._guard_lifted_temporarily():
            assert state["flag"] is True
            errors = {d: {n: state["errors"] for n in ("o", "dq", "dk", "dv", "dg", "dbeta", "dh0")} for d in dtypes}
        return {"device": "fake H200", "capability": "9.0", "triton": "3.6.0", "fla": "0.6.0", "K": K, "V": V,
                "shape": {"B": 1, "T": 256, "H": 2, "HV": 2}, "errors": errors,
                "tolerances": {d: hg.TOLERANCES[d] for d in dtypes}, "passed": hg.selfcheck_passed(errors)}

    monkeypatch.setattr(hg, "run_fla_gdn_selfcheck", selfcheck)
    monkeypatch.delenv(hg.ENV_SELFCHECK, raising=False)
    yield state
    hg._reset_state_for_tests()


def test_unaffected_machine_does_nothing(fake_gpu):
    fake_gpu["info"].update(triton_version="3.7.1", flag_above_3_7_1=True)
    hg.ensure_fla_gdn_backward_allowed(96, 192, torch.bfloat16, "cuda")
    fake_gpu["info"].update(is_hopper=False, triton_version="3.6.0", flag_above_3_7_1=False)
    hg.ensure_fla_gdn_backward_allowed(96, 192, torch.bfloat16, "cuda")
    assert fake_gpu["calls"] == [] and fake_gpu["flag"] is False and hopper_selfcheck_result() is None


def test_default_refuses_with_fix(fake_gpu, monkeypatch):
    monkeypatch.setenv(hg.ENV_SELFCHECK, "0")
    with pytest.raises(RuntimeError) as e:
        hg.ensure_fla_gdn_backward_allowed(96, 192, torch.bfloat16, "cuda")
    msg = str(e.value)
    assert "3.7.1" in msg and "tilelang" in msg and hg.ENV_SELFCHECK in msg and "#640" in msg
    assert fake_gpu["calls"] == [] and fake_gpu["flag"] is False


def test_opt_in_pass_lifts_and_logs(fake_gpu, monkeypatch, caplog):
    monkeypatch.setenv(hg.ENV_SELFCHECK, "1")
    with caplog.at_level(logging.WARNING, logger="megatron_hybrid.runtime"):
        hg.ensure_fla_gdn_backward_allowed(96, 192, torch.bfloat16, "cuda")
    assert fake_gpu["flag"] is True and fake_gpu["calls"] == [(96, 192, ("bfloat16",))]
    rec = [r for r in caplog.records if r.name == "megatron_hybrid.runtime" and r.levelno == logging.WARNING]
    assert rec and "LIFTED" in rec[0].getMessage() and "dg=5.00e-03" in rec[0].getMessage()
    res = hopper_selfcheck_result()
    assert res["passed"] and res["guard_lifted"] and res["errors"]["bfloat16"]["dq"] == 5e-3
    # cached: no second self-check for the same (K, V, dtype); another dtype is checked on its own
    hg.ensure_fla_gdn_backward_allowed(96, 192, torch.bfloat16, "cuda")
    assert len(fake_gpu["calls"]) == 1
    hg.ensure_fla_gdn_backward_allowed(96, 192, torch.float32, "cuda")
    assert fake_gpu["calls"][1] == (96, 192, ("float32",))
    # a new head-dim config is checked on its own, at the caller's head counts (fla autotunes
    # per head count: checking other ones would compile kernel sets training never uses)
    hg.ensure_fla_gdn_backward_allowed(64, 128, torch.bfloat16, "cuda", H=16, HV=32)
    assert len(fake_gpu["calls"]) == 3 and fake_gpu["heads"] == (16, 32)


def test_opt_in_fail_keeps_guard(fake_gpu, monkeypatch):
    monkeypatch.setenv(hg.ENV_SELFCHECK, "1")
    fake_gpu["errors"] = 3e-2
    with pytest.raises(RuntimeError, match="self-check failed") as e:
        hg.ensure_fla_gdn_backward_allowed(96, 192, torch.bfloat16, "cuda")
    assert "dq=3.00e-02" in str(e.value) and fake_gpu["flag"] is False
    res = hopper_selfcheck_result()
    assert res is not None and not res["passed"] and not res["guard_lifted"]
    with pytest.raises(RuntimeError, match="failed earlier"):
        hg.ensure_fla_gdn_backward_allowed(96, 192, torch.bfloat16, "cuda")
    assert len(fake_gpu["calls"]) == 1


def test_temporary_lift_restores_on_error(fake_gpu):
    with pytest.raises(ZeroDivisionError):
        with hg._guard_lifted_temporarily():
            assert fake_gpu["flag"] is True
            raise ZeroDivisionError
    assert fake_gpu["flag"] is False
