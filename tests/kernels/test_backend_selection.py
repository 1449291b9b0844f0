"""Backend selection, the env override, dispatch to fla (with fakes) and import hygiene (docs/design.md §3)."""

from __future__ import annotations

import ast
import pathlib
import sys
import types

import pytest
import torch

import megatron_hybrid.kernels as kernels
from megatron_hybrid.kernels import fla_backend
from megatron_hybrid.runtime import hopper_guard

ENV = "MEGATRON_HYBRID_KERNELS"


@pytest.fixture
def fla_ok(monkeypatch):
    """Pretend fla imports (or not): returns a setter."""
    def set_ok(value: bool):
        monkeypatch.setattr(fla_backend, "_FLA_OK", value)
    return set_ok


def test_auto_selection(monkeypatch, fla_ok):
    monkeypatch.delenv(ENV, raising=False)
    fla_ok(True)
    assert kernels.select_backend("cpu") == "torch"
    assert kernels.select_backend(torch.zeros(1)) == "torch"
    assert kernels.select_backend(torch.device("cuda", 0)) == "fla"
    fla_ok(False)
    assert kernels.select_backend("cuda") == "torch"


def test_env_override(monkeypatch, fla_ok):
    fla_ok(True)
    monkeypatch.setenv(ENV, "torch")
    assert kernels.select_backend("cuda") == "torch"
    monkeypatch.setenv(ENV, "FLA")
    assert kernels.select_backend("cuda") == "fla"
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels.select_backend("cpu")
    fla_ok(False)
    with pytest.raises(RuntimeError, match="does not import"):
        kernels.select_backend("cuda")
    monkeypatch.setenv(ENV, "triton")
    with pytest.raises(ValueError, match=ENV):
        kernels.select_backend("cpu")


def test_explicit_backend_argument(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    x = torch.randn(1, 4, 2, 8)
    v, g, b = torch.randn(1, 4, 2, 8), -torch.rand(1, 4, 2), torch.rand(1, 4, 2)
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels.gated_delta_rule(x, x, v, g, b, backend="fla")
    with pytest.raises(ValueError):
        kernels.gated_delta_rule(x, x, v, g, b, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels.short_conv(torch.randn(1, 4, 3), torch.randn(3, 4), backend="fla")
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels.gated_rms_norm(x, x, torch.ones(8), backend="fla")


def test_fla_wrappers_refuse_cpu_tensors():
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="CUDA"):
        fla_backend.chunk_gated_delta_rule_fla(x, x, x, -torch.rand(1, 4, 2), torch.rand(1, 4, 2))
    with pytest.raises(RuntimeError, match="CUDA"):
        fla_backend.short_conv_fla(torch.randn(1, 4, 3), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="CUDA"):
        fla_backend.gated_rms_norm_fla(x, x, torch.ones(8))


def test_cpu_auto_path_is_torch(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    q, k = torch.randn(1, 9, 1, 4), torch.randn(1, 9, 1, 4)
    v, g, b = torch.randn(1, 9, 2, 4), -torch.rand(1, 9, 2), torch.rand(1, 9, 2)
    o, _ = kernels.gated_delta_rule(q, k, v, g, b, use_qk_l2norm_in_kernel=True)
    o2, _ = kernels.chunk_gated_delta_rule_torch(q, k, v, g, b, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(o, o2, rtol=0, atol=0)


@pytest.fixture
def fake_fla(monkeypatch):
    """Install fake fla modules recording the calls, and let CPU tensors through the CUDA check."""
    calls = {}

    def gdr(*args, **kwargs):
        calls["gdr"] = (args, kwargs)
        return args[2] * 0, None

    def conv(x, **kwargs):
        calls["conv"] = (x, kwargs)
        return x * 0, None

    def norm(*args, **kwargs):
        calls["norm"] = (args, kwargs)
        return args[0] * 0

    mods = {
        "fla": types.ModuleType("fla"),
        "fla.ops": types.ModuleType("fla.ops"),
        "fla.ops.gated_delta_rule": types.SimpleNamespace(chunk_gated_delta_rule=gdr),
        "fla.modules": types.ModuleType("fla.modules"),
        "fla.modules.causal_conv1d": types.SimpleNamespace(causal_conv1d=conv),
        "fla.modules.norm": types.ModuleType("fla.modules.norm"),
        "fla.modules.norm.fused_norm_gate": types.SimpleNamespace(rms_norm_gated=norm),
    }
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(fla_backend, "_require_cuda", lambda *t: None)
    monkeypatch.setattr(kernels, "_check_fla_usable", lambda dev: None)
    return calls


def test_fla_argument_binding(fake_fla, monkeypatch):
    guard_calls = []
    monkeypatch.setattr(hopper_guard, "ensure_fla_gdn_backward_allowed", lambda *a, **kw: guard_calls.append((*a, kw)))
    q = torch.randn(1, 6, 2, 8)
    v, g, b = torch.randn(1, 6, 4, 16), -torch.rand(1, 6, 4), torch.rand(1, 6, 4)
    h0, cu = torch.zeros(2, 4, 8, 16), torch.tensor([0, 2, 6])
    with torch.no_grad():
        kernels.gated_delta_rule(q, q, v, g, b, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                 use_qk_l2norm_in_kernel=True, backend="fla")
    args, kw = fake_fla["gdr"]
    assert len(args) == 5 and args[3] is g and args[4] is b
    assert kw == dict(scale=None, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
                      use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, cu_seqlens=cu, chunk_size=64)
    kernels.gated_delta_rule(q.requires_grad_(), q, v, g, b, backend="fla")
    # the kernels never apply the Hopper policy (the GDN layer does: tests/layers/test_gdn_hopper_guard.py)
    assert guard_calls == []

    w = torch.randn(5, 1, 4)
    kernels.short_conv(torch.randn(1, 6, 5), w, cu_seqlens=cu, backend="fla")
    _, kw = fake_fla["conv"]
    assert kw["weight"].shape == (5, 4) and torch.equal(kw["weight"], w[:, 0])
    assert kw["activation"] == "silu" and kw["bias"] is None and kw["cu_seqlens"] is cu
    assert kw["backend"] == "triton" and kw["initial_state"] is None

    x, z, wn = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.ones(8)
    kernels.gated_rms_norm(x, z, wn, backend="fla")
    args, kw = fake_fla["norm"]
    assert args[0] is x and args[1] is z and args[2] is wn and args[3] is None
    assert kw == {"activation": "swish", "eps": 1e-5}


def test_kernels_never_import_megatron_core_or_fla_at_module_level():
    root = pathlib.Path(kernels.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n == "megatron" or n.startswith("megatron.") for n in names), (path.name, names)
        for node in tree.body:  # module level: no fla / triton
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("fla", "triton") for n in names), (path.name, names)
