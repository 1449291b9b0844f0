"""The GDN in_proj's aligned GEMM (layers/aligned_linear.py): padding the weight to 64 rows gives
the plain column-parallel linear's outputs and gradients, and leaves the parameter's shape alone.
Checked on CPU by forcing the padded path (on GPUs it is the default)."""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear

import megatron_hybrid.layers.aligned_linear as aligned
from megatron_hybrid.config import preset_config
from tests.dist import run_distributed


def _worker(rank, tp):
    cfg = preset_config("tiny", vocab_size=512)
    tc = cfg.to_transformer_config(tp, 1, params_dtype=torch.float64)
    init = torch.nn.init.normal_
    kw = dict(config=tc, init_method=init, gather_output=False, bias=False, skip_bias_add=False)
    n_out = 2 * 61 * tp  # not a multiple of 64 per rank
    plain = ColumnParallelLinear(24, n_out, **kw)
    padded = aligned.AlignedColumnParallelLinear(24, n_out, **kw)
    padded.weight.data.copy_(plain.weight.data)
    x = torch.randn(5, 3, 24, dtype=torch.float64)
    aligned.PAD_ON_CPU = True
    try:
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [m(xi)[0] for m, xi in zip((plain, padded), xs, strict=True)]
        g = torch.randn_like(outs[0])
        for o in outs:
            o.backward(g)
    finally:
        aligned.PAD_ON_CPU = False
    assert padded.weight.shape == plain.weight.shape == (n_out // tp, 24)
    return {"shape": tuple(outs[1].shape), "dy": (outs[0] - outs[1]).abs().max().item(),
            "dx": (xs[0].grad - xs[1].grad).abs().max().item(),
            "dw": (plain.weight.grad - padded.weight.grad).abs().max().item()}


def test_padded_gemm_equals_the_plain_linear_at_tp1_and_tp2():
    for tp in (1, 2):
        for r in run_distributed(_worker, tp, tp, tp=tp):
            assert r["shape"] == (5, 3, 61 * 2)
            assert r["dy"] < 1e-12 and r["dx"] < 1e-12 and r["dw"] < 1e-12, r
