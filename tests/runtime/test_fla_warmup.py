"""The parallel fla warm-up: config sharing between workers, shapes a run warms, CPU behaviour,
and the GDN mixer core the warm-up and the layer share (checked against an fp64 step-by-step
reference of docs/model.md §4)."""
from __future__ import annotations

import sys
import types
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

from megatron_hybrid.kernels.gdn_mixer import gdn_mixer
from megatron_hybrid.runtime import fla_warmup
from megatron_hybrid.runtime.fla_warmup import GdnKernelShape, restrict_autotune_configs, warm_fla_kernels


class FakeAutotuner:
    def __init__(self, configs):
        self.configs = list(configs)


class FakeHeuristics:  # triton.heuristics wraps the autotuner as .fn
    def __init__(self, fn):
        self.fn = fn


@pytest.fixture
def fake_fla(monkeypatch):
    a, b, c = FakeAutotuner(range(25)), FakeAutotuner(range(3)), FakeAutotuner(range(6))
    mod = types.ModuleType("fakefla.ops.x")
    mod.kernel_a, mod.kernel_b, mod.kernel_c = a, FakeHeuristics(b), c
    mod.alias_of_a = a  # the same autotuner under two names is restricted once
    monkeypatch.setitem(sys.modules, "fakefla.ops.x", mod)
    return a, b, c


def test_worker_shares_are_disjoint_and_cover_every_config(fake_fla):
    workers = 4
    seen = {name: [] for name in "abc"}
    for w in range(workers):
        tuners = [FakeAutotuner(range(n)) for n in (25, 3, 6)]
        mod = sys.modules["fakefla.ops.x"]
        mod.kernel_a, mod.kernel_b, mod.kernel_c = tuners[0], FakeHeuristics(tuners[1]), tuners[2]
        mod.alias_of_a = tuners[0]
        n = restrict_autotune_configs(w, workers, module_prefix="fakefla.", autotuner_type=FakeAutotuner)
        assert n == 3
        for name, t in zip("abc", tuners, strict=True):
            assert t.configs, "every worker keeps at least one config"
            seen[name].append(t.configs)
    assert sorted(sum(seen["a"], [])) == list(range(25))
    assert all(set(x).isdisjoint(y) for i, x in enumerate(seen["a"]) for y in seen["a"][i + 1:])
    # 3 configs over 4 workers: workers 0-2 take one each, worker 3 repeats the first
    assert seen["b"] == [[0], [1], [2], [0]]


def test_restrict_rejects_a_bad_worker_index(fake_fla):
    with pytest.raises(ValueError, match="worker 4 is outside"):
        restrict_autotune_configs(4, 4, module_prefix="fakefla.", autotuner_type=FakeAutotuner)


def test_cpu_and_disabled_warmups_return_at_once():
    shape = GdnKernelShape(1, 64, 2, 2, 8, 16)
    assert warm_fla_kernels([shape], workers=0)["skipped"] == "disabled"
    if not torch.cuda.is_available():
        assert warm_fla_kernels([shape], workers=4)["skipped"] == "no CUDA"


def test_shape_checks():
    with pytest.raises(ValueError, match="documents=4 needs batch 1"):
        GdnKernelShape(2, 64, 2, 2, 8, 16, documents=4)
    with pytest.raises(ValueError, match="not a multiple"):
        GdnKernelShape(1, 64, 2, 3, 8, 16)


def test_default_workers_reads_the_environment(monkeypatch):
    monkeypatch.setenv(fla_warmup.ENV_WORKERS, "3")
    assert fla_warmup.default_workers() == 3
    monkeypatch.delenv(fla_warmup.ENV_WORKERS)
    assert 1 <= fla_warmup.default_workers() <= 8


def test_training_shapes_divide_heads_by_tp_times_cp_and_pack_the_micro_batch():
    from megatron_hybrid.config import preset_config
    from megatron_hybrid.runtime.kernel_warmup import training_gdn_shapes

    cfg = preset_config("olmo_hybrid_7b")
    args = Namespace(tensor_model_parallel_size=1, context_parallel_size=2, bf16=True,
                     micro_batch_size=2, seq_length=32768, reset_attention_mask=True)
    (s,) = training_gdn_shapes(args, cfg)
    assert (s.batch, s.seq, s.documents) == (1, 65536, 4)
    assert (s.key_heads, s.value_heads) == (cfg.linear_num_key_heads // 2, cfg.linear_num_value_heads // 2)
    assert (s.key_head_dim, s.value_head_dim, s.dtype) == (cfg.linear_key_head_dim, cfg.linear_value_head_dim,
                                                          "bfloat16")
    qk = cfg.num_attention_heads * cfg.kv_channels
    # 2 x 32768 tokens over CP 2; hidden and QK widths coincide for the 7B (3840): warmed once
    want = [(32768, cfg.hidden_size), (32768, qk), (32768, cfg.num_query_groups * cfg.kv_channels)]
    assert s.norms == tuple(dict.fromkeys(want))
    args.reset_attention_mask, args.bf16 = False, False
    args.tensor_model_parallel_size, args.context_parallel_size, args.sequence_parallel = 2, 1, True
    (s,) = training_gdn_shapes(args, cfg)
    assert (s.batch, s.seq, s.documents, s.dtype) == (2, 32768, 0, "float32")
    assert s.key_heads == cfg.linear_num_key_heads // 2
    assert s.norms == ((32768, cfg.hidden_size),)  # 2 x 32768 tokens over TP 2; no QK-norm at TP 2


def _reference_mixer(proj, conv_w, A_log, dt_bias, norm_w, K, V, eps=1e-5):
    """fp64, token by token (docs/model.md §4 steps 2-7), B = 1."""
    proj, conv_w = proj.double()[:, 0], conv_w.double()[:, 0]            # [S, C], [C_conv, W]
    HV = A_log.numel()
    vd, C_conv = HV * V, conv_w.shape[0]
    kd = (C_conv - vd) // 2
    H = kd // K
    S, W = proj.shape[0], conv_w.shape[1]
    x = proj[:, :C_conv]
    padded = torch.cat([x.new_zeros(W - 1, C_conv), x])
    conv = torch.stack([(padded[t:t + W].T * conv_w).sum(-1) for t in range(S)])
    conv = F.silu(conv)
    q, k, v = conv[:, :kd].view(S, H, K), conv[:, kd:2 * kd].view(S, H, K), conv[:, 2 * kd:].view(S, HV, V)
    z = proj[:, C_conv:C_conv + vd].view(S, HV, V)
    b, a = proj[:, C_conv + vd:C_conv + vd + HV], proj[:, C_conv + vd + HV:]
    beta = 2 * torch.sigmoid(b)
    g = -torch.exp(A_log.double()) * F.softplus(a + dt_bias.double())
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    rep = HV // H
    state = torch.zeros(HV, K, V, dtype=torch.float64)
    out = torch.zeros(S, HV, V, dtype=torch.float64)
    for t in range(S):
        for h in range(HV):
            kh, qh = k[t, h // rep], q[t, h // rep] * K ** -0.5
            s = torch.exp(g[t, h]) * state[h]
            s = s - beta[t, h] * torch.outer(kh, kh @ s) + beta[t, h] * torch.outer(kh, v[t, h])
            state[h] = s
            out[t, h] = qh @ s
    normed = out * torch.rsqrt((out * out).mean(-1, keepdim=True) + eps) * norm_w.double() * F.silu(z)
    return normed.reshape(S, 1, vd)


def test_gdn_mixer_matches_an_fp64_token_by_token_reference():
    torch.manual_seed(0)
    S, H, HV, K, V, W = 37, 2, 4, 8, 16, 4
    C = 2 * H * K + 2 * HV * V + 2 * HV
    proj = torch.randn(S, 1, C, dtype=torch.float64)
    conv_w = 0.3 * torch.randn(2 * H * K + HV * V, 1, W, dtype=torch.float64)
    A_log = torch.log(torch.rand(HV, dtype=torch.float64) * 15 + 1)
    dt_bias = torch.randn(HV, dtype=torch.float64) - 3
    norm_w = 1 + 0.1 * torch.randn(V, dtype=torch.float64)
    got = gdn_mixer(proj, conv_w, A_log, dt_bias, norm_w, key_head_dim=K, value_head_dim=V,
                    allow_neg_eigval=True, backend="torch")
    want = _reference_mixer(proj, conv_w, A_log, dt_bias, norm_w, K, V)
    assert got.shape == (S, 1, HV * V)
    # beta and g are formed in fp32 (as in the layer), so agreement is at fp32 level, not fp64
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_gdn_mixer_names_mismatched_channels():
    proj = torch.randn(5, 1, 10)
    with pytest.raises(ValueError, match="do not fit HV=2, K=8, V=16"):
        gdn_mixer(proj, torch.randn(64, 1, 4), torch.zeros(2), torch.zeros(2), torch.ones(16),
                  key_head_dim=8, value_head_dim=16, backend="torch")


def test_run_shape_drives_forward_and_backward_through_the_mixer():
    """The warm-up's workload on the PyTorch path (on a GPU it is the fla path): both variants."""
    for shape in (GdnKernelShape(1, 48, 2, 4, 8, 16, documents=4, dtype="float32", norms=[[48, 32]]),
                  GdnKernelShape(2, 24, 2, 2, 8, 16, dtype="bfloat16")):
        fla_warmup.run_shape(shape, "cpu", backend="torch")


class _TooBig(Exception):
    pass


class FakeRunningAutotuner:
    """Runs like Triton's autotuner: one config is launched untimed; otherwise the fastest of
    those that fit is; configs named 'big' need more shared memory than the GPU has."""

    def __init__(self, configs):
        self.configs, self.cache, self.launched = list(configs), {}, []

    def run(self, key):
        fits = [c for c in self.configs if c != "big"]
        chosen = self.configs[0] if len(self.configs) == 1 else (fits[0] if fits else "big")
        if chosen == "big":
            raise _TooBig("out of resource: shared memory")
        self.cache[key] = chosen
        self.launched.append(chosen)
        return chosen


def test_a_share_that_cannot_launch_retries_with_every_config(monkeypatch):
    monkeypatch.setattr(FakeRunningAutotuner, "run", FakeRunningAutotuner.run)  # restored after
    mod = types.ModuleType("fakefla.ops.y")
    mod.k = FakeRunningAutotuner(["small", "big", "small2", "big"])
    monkeypatch.setitem(sys.modules, "fakefla.ops.y", mod)
    restrict_autotune_configs(1, 2, module_prefix="fakefla.ops.y", autotuner_type=FakeRunningAutotuner)
    assert mod.k.configs == ["big", "big"]
    fla_warmup.fall_back_to_all_configs(FakeRunningAutotuner, (_TooBig,))
    fla_warmup.fall_back_to_all_configs(FakeRunningAutotuner, (_TooBig,))  # idempotent
    assert mod.k.run("key") == "small" and mod.k.configs == ["small", "big", "small2", "big"]
    plain = FakeRunningAutotuner(["big"])  # not restricted: the error is the autotuner's own
    with pytest.raises(_TooBig):
        plain.run("key")


def test_bad_worker_counts_are_refused_with_the_name(monkeypatch):
    from megatron_hybrid.config.arguments import ArgumentError, parse_args

    monkeypatch.setenv(fla_warmup.ENV_WORKERS, "abc")
    with pytest.raises(ValueError, match="MEGATRON_HYBRID_FLA_WARMUP_WORKERS='abc'"):
        fla_warmup.default_workers()
    with pytest.raises(ArgumentError, match="--fla-warmup-workers must be >= 0"):
        parse_args(["--model-preset", "tiny", "--mock-data", "--seq-length", "32", "--train-iters", "1",
                    "--lr", "1e-4", "--fla-warmup-workers", "-1"], world_size=1)
