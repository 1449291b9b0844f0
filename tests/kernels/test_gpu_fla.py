"""fla (Triton) vs the PyTorch kernels on a CUDA GPU; skipped without CUDA or fla.

On Hopper with Triton >= 3.4, < 3.7.1 the GDN backward test also exercises the guard policy: the default
refusal, then the explicit opt-in self-check (its result is printed; run pytest with -s to see it).
"""

from __future__ import annotations

import pytest
import torch

import megatron_hybrid.kernels as kernels
from megatron_hybrid.kernels import fla_backend
from megatron_hybrid.runtime import hopper_guard

from .reference import rel_err
from .test_gated_delta_rule import make_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOL = {torch.float32: 1e-2, torch.bfloat16: 2e-2}
K, V = 96, 192  # the Olmo Hybrid head dims


@pytest.fixture(autouse=True)
def _need_fla(monkeypatch):
    if not fla_backend.fla_available():
        pytest.skip("fla does not import")
    monkeypatch.delenv("MEGATRON_HYBRID_KERNELS", raising=False)


def _cuda(xs, dtype):
    return [x.cuda().to(dtype) if i in (0, 1, 2, 4) else x.cuda() for i, x in enumerate(xs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gdn_forward_packed_grouped(dtype):
    assert kernels.select_backend("cuda") == "fla"
    cu = torch.tensor([0, 100, 256], device="cuda")
    q, k, v, g, beta, h0 = _cuda(make_inputs(1, 256, 2, 4, K, V, N=2), dtype)
    with torch.no_grad():
        o, ht = kernels.gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                         cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
        o_r, ht_r = kernels.gated_delta_rule(*(x.double() for x in (q, k, v, g, beta)), initial_state=h0.double(),
                                             output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True,
                                             backend="torch")
    assert o.dtype == dtype and ht.dtype == torch.float32
    e_o, e_h = rel_err(o, o_r), rel_err(ht, ht_r)
    print(f"\nfla GDN fwd {dtype}: o {e_o:.2e} final_state {e_h:.2e}")
    assert e_o <= TOL[dtype] and e_h <= TOL[dtype]


def test_gdn_backward_with_hopper_policy(monkeypatch):
    info = hopper_guard._fla_guard_info()
    fires = hopper_guard.fla_guard_would_fire(**info)
    print(f"\nguard info {info}; fla guard would fire: {fires}")
    ins = _cuda(make_inputs(1, 256, 2, 2, K, V), torch.bfloat16)
    if fires and (K, V, "bfloat16") not in hopper_guard._RESULTS:
        monkeypatch.delenv(hopper_guard.ENV_SELFCHECK, raising=False)
        with pytest.raises(RuntimeError, match="3.7.1"):
            hopper_guard.ensure_fla_gdn_backward_allowed(K, V, torch.bfloat16, "cuda", H=2, HV=2)
        monkeypatch.setenv(hopper_guard.ENV_SELFCHECK, "1")
    for dtype in (torch.bfloat16, torch.float32):
        # the policy the GDN layer applies before a training forward (the kernels do not)
        hopper_guard.ensure_fla_gdn_backward_allowed(K, V, dtype, "cuda", H=2, HV=2)
        xs = [x.detach().clone().to(dtype if i in (0, 1, 2, 4) else x.dtype).requires_grad_() for i, x in enumerate(ins)]
        o, ht = kernels.gated_delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True,
                                         use_qk_l2norm_in_kernel=True)
        do, dht = torch.randn_like(o), torch.randn_like(ht)
        grads = torch.autograd.grad((o.float() * do.float()).sum() + (ht * dht).sum(), xs)
        ref = [x.detach().double().requires_grad_() for x in xs]
        o_r, ht_r = kernels.gated_delta_rule(*ref[:5], initial_state=ref[5], output_final_state=True,
                                             use_qk_l2norm_in_kernel=True, backend="torch")
        grads_r = torch.autograd.grad((o_r * do.double()).sum() + (ht_r * dht.double()).sum(), ref)
        errs = {"o": rel_err(o, o_r)} | {n: rel_err(a, b) for n, a, b in
                                         zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), grads, grads_r, strict=True)}
        print(f"fla GDN fwd+bwd {dtype}: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))
        assert all(e <= TOL[dtype] for e in errs.values()), errs
    print(f"hopper_selfcheck_result(): {hopper_guard.hopper_selfcheck_result()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_short_conv(dtype, packed):
    B, cu = (1, torch.tensor([0, 3, 77, 200], device="cuda")) if packed else (2, None)
    x = torch.randn(B, 200, 384, device="cuda", dtype=dtype, requires_grad=True)
    w = (0.3 * torch.randn(384, 1, 4, device="cuda", dtype=dtype)).requires_grad_()
    y = kernels.short_conv(x, w, cu_seqlens=cu)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad((y * dy).sum(), (x, w))
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = kernels.short_conv(xr, wr, cu_seqlens=cu, backend="torch")
    gxr, gwr = torch.autograd.grad((yr * dy.double()).sum(), (xr, wr))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    errs = {"y": rel_err(y, yr), "dx": rel_err(gx, gxr), "dw": rel_err(gw, gwr)}
    print(f"\nfla short conv {dtype} packed={packed}: {errs}")
    assert y.dtype == dtype and all(e <= tol for e in errs.values()), errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gated_rms_norm(dtype):
    x = torch.randn(2, 64, 4, V, device="cuda", dtype=dtype, requires_grad=True)
    z = torch.randn(2, 64, 4, V, device="cuda", dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(V, device="cuda")).requires_grad_()
    y = kernels.gated_rms_norm(x, z, w, 1e-5)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad((y * dy).sum(), (x, z, w))
    ref = [t.detach().double().requires_grad_() for t in (x, z, w)]
    yr = kernels.gated_rms_norm(*ref, 1e-5, backend="torch")
    grads_r = torch.autograd.grad((yr * dy.double()).sum(), ref)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    errs = {"y": rel_err(y, yr)} | {n: rel_err(a, b) for n, a, b in zip(("dx", "dz", "dw"), grads, grads_r, strict=True)}
    print(f"\nfla gated rms norm {dtype}: {errs}")
    assert y.dtype == dtype and all(e <= tol for e in errs.values()), errs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm(dtype):
    """fla's fused RMSNorm (the model norms on GPUs) vs the fp64 PyTorch formula, with gradients."""
    x = torch.randn(3, 50, 384, device="cuda", dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(384, device="cuda")).to(dtype).requires_grad_()
    y = kernels.rms_norm(x, w, 1e-6, backend="fla")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad((y * dy).sum(), (x, w))
    ref = [t.detach().double().requires_grad_() for t in (x, w)]
    yr = kernels.rms_norm(*ref, 1e-6, backend="torch")
    grads_r = torch.autograd.grad((yr * dy.double()).sum(), ref)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    errs = {"y": rel_err(y, yr)} | {n: rel_err(a, b) for n, a, b in zip(("dx", "dw"), grads, grads_r, strict=True)}
    print(f"\nfla rms norm {dtype}: {errs}")
    assert y.dtype == dtype and all(e <= tol for e in errs.values()), errs
