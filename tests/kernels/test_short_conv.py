"""Causal depthwise short conv vs an explicit fp64 loop (docs/model.md §4 step 2)."""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.kernels import short_conv
from megatron_hybrid.kernels.short_conv import short_conv_torch

from .reference import rel_err, short_conv_reference

TOL = 1e-6


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("layout", ["cw", "c1w"])
@pytest.mark.parametrize("T", [1, 3, 37])
def test_matches_loop(T, layout, activation, record_err):
    x = torch.randn(2, T, 6, requires_grad=True)
    w = torch.randn(6, 4) if layout == "cw" else torch.randn(6, 1, 4)
    w.requires_grad_()
    y = short_conv_torch(x, w, activation=activation)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad((y * dy).sum(), (x, w))
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = short_conv_reference(xr, wr, activation=activation)
    gxr, gwr = torch.autograd.grad((yr * dy.double()).sum(), (xr, wr))
    for name, a, b in (("y", y, yr), ("dx", gx, gxr), ("dw", gw, gwr)):
        assert record_err(f"short conv vs loop: {name}", rel_err(a, b)) <= TOL, name


def test_current_token_is_last_tap():
    """PyTorch Conv1d orientation: with w = [0, 0, 0, 1] the conv is the identity."""
    x = torch.randn(1, 9, 3)
    w = torch.zeros(3, 4)
    w[:, -1] = 1
    torch.testing.assert_close(short_conv(x, w, activation=None, backend="torch"), x)
    w = torch.zeros(3, 4)
    w[:, 0] = 1  # three tokens back
    y = short_conv(x, w, activation=None)
    torch.testing.assert_close(y[:, 3:], x[:, :-3])
    assert y[:, :3].abs().max() == 0


def test_matches_torch_conv1d_module():
    conv = torch.nn.Conv1d(8, 8, 4, groups=8, padding=3, bias=False)
    x = torch.randn(2, 20, 8)
    ref = torch.nn.functional.silu(conv(x.transpose(1, 2))[..., :20]).transpose(1, 2)
    torch.testing.assert_close(short_conv_torch(x, conv.weight.detach()), ref, rtol=1e-6, atol=1e-6)


def test_documents_reset_history(record_err):
    cu = torch.tensor([0, 5, 6, 6, 30])  # includes a 1-token and an empty document
    x = torch.randn(1, 30, 5, requires_grad=True)
    w = torch.randn(5, 1, 4, requires_grad=True)
    y = short_conv_torch(x, w, cu_seqlens=cu)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad((y * dy).sum(), (x, w))
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = short_conv_reference(xr, wr, cu_seqlens=cu)
    gxr, gwr = torch.autograd.grad((yr * dy.double()).sum(), (xr, wr))
    for name, a, b in (("y", y, yr), ("dx", gx, gxr), ("dw", gw, gwr)):
        assert record_err(f"short conv docs vs loop: {name}", rel_err(a, b)) <= TOL, name
    # each document alone gives the same output
    for s, e in ((0, 5), (5, 6), (6, 30)):
        torch.testing.assert_close(y[:, s:e], short_conv_torch(x[:, s:e], w), rtol=1e-6, atol=1e-6)


def test_bf16_rounds_once():
    x = torch.randn(1, 16, 8).bfloat16()
    w = torch.randn(8, 4).bfloat16()
    y = short_conv_torch(x, w)
    assert y.dtype == torch.bfloat16
    ref = short_conv_reference(x, w).to(torch.bfloat16)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["weight", "act", "cu_batch", "cu_end"])
def test_errors(bad):
    x, w, kw = torch.randn(2, 8, 4), torch.randn(4, 3), {}
    if bad == "weight":
        w = torch.randn(5, 3)
    elif bad == "act":
        kw["activation"] = "gelu"
    elif bad == "cu_batch":
        kw["cu_seqlens"] = torch.tensor([0, 8])
    else:
        x, kw["cu_seqlens"] = x[:1], torch.tensor([0, 7])
    with pytest.raises(ValueError):
        short_conv_torch(x, w, **kw)
