"""Chunked PyTorch gated delta rule vs the fp64 per-token oracle (docs/model.md §4 step 6)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_hybrid.kernels import gated_delta_rule
from megatron_hybrid.kernels.gated_delta_rule_torch import chunk_gated_delta_rule_torch

from .reference import gdn_recurrent_reference, rel_err

TOL = 1e-5
NAMES = ("q", "k", "v", "g", "beta", "h0")


def make_inputs(B, T, H, HV, K, V, *, N=None, l2=True, decay_scale=1.0, dtype=torch.float32):
    """Raw q, k (keys pre-normalised when the kernel does not normalise), beta in (0, 2),
    g = -A softplus(a + dt_bias) as the model computes it (docs/model.md §4 step 5)."""
    q = torch.randn(B, T, H, K)
    k = torch.randn(B, T, H, K)
    if not l2:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, HV, V)
    A = torch.exp(torch.rand(HV) * math.log(16.0))
    dt = torch.exp(math.log(1e-3) + torch.rand(HV) * math.log(100.0))
    g = -decay_scale * A * F.softplus(torch.randn(B, T, HV) + dt + torch.log(-torch.expm1(-dt)))
    beta = 2 * torch.sigmoid(torch.randn(B, T, HV))
    h0 = 0.5 * torch.randn(N or B, HV, K, V)
    return [x.to(dtype) if i in (0, 1, 2, 4) else x for i, x in enumerate((q, k, v, g, beta, h0))]


def compare(ins, record_err, tag, *, l2, cu_seqlens=None, chunk_size=64, tol=TOL):
    ins = [x.clone().requires_grad_() for x in ins]
    o, ht = chunk_gated_delta_rule_torch(*ins[:5], initial_state=ins[5], output_final_state=True,
                                         use_qk_l2norm_in_kernel=l2, cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    assert o.dtype == ins[0].dtype and ht.dtype == torch.float32
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), ins)

    ref_in = [x.detach().double().requires_grad_() for x in ins]
    o_r, ht_r = gdn_recurrent_reference(*ref_in[:5], initial_state=ref_in[5], use_qk_l2norm=l2,
                                        cu_seqlens=cu_seqlens)
    grads_r = torch.autograd.grad((o_r * do.double()).sum() + (ht_r * dht.double()).sum(), ref_in)
    errs = {"o": rel_err(o, o_r), "final_state": rel_err(ht, ht_r)}
    errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip(NAMES, grads, grads_r, strict=True)})
    for name, e in errs.items():
        record_err(f"gdn fp32 vs oracle: {name}", e)
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"{tag}: errors above {tol}: {bad}"


@pytest.mark.parametrize("l2", [True, False], ids=["l2", "nol2"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_matches_oracle_grouped_batched(T, l2, record_err):
    """B=2, H=2, HV=4 (grouped values), initial and final state, every gradient."""
    ins = make_inputs(2, T, 2, 4, 16, 24, l2=l2)
    compare(ins, record_err, f"T={T}", l2=l2)


@pytest.mark.parametrize("l2", [True, False], ids=["l2", "nol2"])
def test_matches_oracle_packed_documents(l2, record_err):
    """3 documents (50, 70, 80) packed with cu_seqlens, each from its own initial_state row."""
    cu = torch.tensor([0, 50, 120, 200])
    ins = make_inputs(1, 200, 2, 4, 16, 24, N=3, l2=l2)
    compare(ins, record_err, "packed", l2=l2, cu_seqlens=cu)


def test_packed_documents_equal_separate_runs():
    """Each document of a packed batch equals that document run alone (no cross-document leakage)."""
    cu = [0, 37, 37, 130, 131]  # includes an empty and a one-token document
    q, k, v, g, beta, h0 = make_inputs(1, 131, 2, 2, 8, 12, N=4)
    o, ht = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                         cu_seqlens=torch.tensor(cu), use_qk_l2norm_in_kernel=True)
    for n in range(4):
        s, e = cu[n], cu[n + 1]
        if s == e:
            torch.testing.assert_close(ht[n], h0[n])
            continue
        o_n, ht_n = chunk_gated_delta_rule_torch(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e],
                                                 initial_state=h0[n:n + 1], output_final_state=True,
                                                 use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(o[:, s:e], o_n, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ht[n:n + 1], ht_n, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 16, 50])
def test_other_chunk_sizes(chunk_size, record_err):
    ins = make_inputs(1, 100, 1, 2, 8, 8)
    compare(ins, record_err, f"C={chunk_size}", l2=True, chunk_size=chunk_size)


def test_strong_decay_is_finite_and_exact(record_err):
    """Decays of e^-50 per token underflow inside a chunk: no inf/nan in outputs or gradients."""
    ins = make_inputs(1, 130, 1, 1, 8, 8, decay_scale=200.0)
    assert ins[3].min() < -20
    compare(ins, record_err, "strong decay", l2=True)


def test_fp64_inputs_compute_in_fp64():
    q, k, v, g, beta, h0 = (x.double() for x in make_inputs(1, 70, 2, 2, 8, 8))
    o, ht = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                         use_qk_l2norm_in_kernel=True)
    o_r, ht_r = gdn_recurrent_reference(q, k, v, g, beta, initial_state=h0, use_qk_l2norm=True)
    assert o.dtype == torch.float64 and rel_err(o, o_r) < 1e-12 and rel_err(ht, ht_r) < 1e-12


def test_bf16_inputs():
    q, k, v, g, beta, h0 = make_inputs(1, 80, 2, 2, 16, 16, dtype=torch.bfloat16)
    o, ht = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                             use_qk_l2norm_in_kernel=True, backend="torch")
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    o_r, _ = gdn_recurrent_reference(q, k, v, g, beta, initial_state=h0, use_qk_l2norm=True)
    assert rel_err(o, o_r) < 1e-2


def test_defaults_zero_state_and_scale():
    q, k, v, g, beta, _ = make_inputs(2, 10, 1, 1, 4, 4)
    o, ht = chunk_gated_delta_rule_torch(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    assert ht is None
    o_r, _ = gdn_recurrent_reference(q, k, v, g, beta, use_qk_l2norm=True)
    assert rel_err(o, o_r) < 1e-5
    o2, _ = chunk_gated_delta_rule_torch(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, scale=1.0)
    assert rel_err(o2, o_r * 2.0) < 1e-5  # K = 4: default scale 1/2


@pytest.mark.parametrize("bad", ["hv", "g", "h0", "cu_batch", "cu_end", "cu_float"])
def test_errors(bad):
    q, k, v, g, beta, h0 = make_inputs(2, 8, 2, 4, 4, 4)
    kw = {}
    if bad == "hv":
        v = v[:, :, :3]
        g, beta = g[..., :3], beta[..., :3]
    elif bad == "g":
        g = g[..., :2]
    elif bad == "h0":
        kw["initial_state"] = h0[:1]
    elif bad == "cu_batch":
        kw["cu_seqlens"] = torch.tensor([0, 8])
    else:
        q, k, v, g, beta = (x[:1] for x in (q, k, v, g, beta))
        kw["cu_seqlens"] = torch.tensor([0, 5]) if bad == "cu_end" else torch.tensor([0.0, 8.0])
    with pytest.raises(ValueError):
        chunk_gated_delta_rule_torch(q, k, v, g, beta, **kw)
