"""l2_norm, rms_norm and gated RMSNorm vs direct fp64 formulas (docs/model.md §2, §4 steps 3 and 7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_hybrid.kernels import gated_rms_norm, l2_norm, rms_norm
from megatron_hybrid.kernels.norms import gated_rms_norm_torch

from .reference import rel_err


def test_l2_norm(record_err):
    x = torch.randn(3, 5, 16)
    ref = x.double() / torch.sqrt((x.double() ** 2).sum(-1, keepdim=True) + 1e-6)
    assert record_err("l2_norm", rel_err(l2_norm(x), ref)) < 1e-6
    assert l2_norm(x.bfloat16()).dtype == torch.bfloat16


def test_rms_norm(record_err):
    x, w = torch.randn(4, 32), torch.randn(32)
    xd = x.double()
    ref = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert record_err("rms_norm", rel_err(rms_norm(x, w, 1e-6), ref)) < 1e-6
    xb = x.bfloat16()
    y = rms_norm(xb, w, 1e-6)
    assert y.dtype == torch.bfloat16
    xbd = xb.double()
    ref_b = xbd / torch.sqrt((xbd ** 2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(y, ref_b.bfloat16(), rtol=2 ** -8, atol=0)  # fp32 math, one rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm(dtype, record_err):
    x, z, w = torch.randn(2, 7, 3, 24), torch.randn(2, 7, 3, 24), torch.rand(24) + 0.5
    x, z = x.to(dtype), z.to(dtype)
    xd, zd = x.double(), z.double()
    ref = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-5) * w.double() * zd * torch.sigmoid(zd)
    y = gated_rms_norm(x, z, w)  # eps default 1e-5
    assert y.dtype == dtype
    if dtype == torch.float32:
        assert record_err("gated_rms_norm", rel_err(y, ref)) < 1e-6
    else:  # a single rounding of the fp32 result (FusedRMSNormGated semantics)
        torch.testing.assert_close(y, ref.to(dtype), rtol=2 ** -8, atol=1e-6)


def test_gated_rms_norm_grad(record_err):
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: gated_rms_norm_torch(a, b, c, 1e-5), (x, z, w))


def test_gated_norm_is_norm_then_gate():
    """Not silu(z) normalised: the gate multiplies after the norm."""
    x, z, w = torch.randn(4, 8), torch.randn(4, 8), torch.ones(8)
    y = gated_rms_norm_torch(x, z, w)
    torch.testing.assert_close(y, rms_norm(x, w, 1e-5) * F.silu(z))


def test_shape_errors():
    with pytest.raises(ValueError):
        gated_rms_norm_torch(torch.randn(2, 8), torch.randn(2, 4), torch.ones(8))
    with pytest.raises(ValueError):
        rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)
