"""Head-parallel context parallelism (layers/context_parallel.py): CP=2 equals CP=1 for the
logits and the gradients of the model (with TP=2 too, and for packed documents), and a training
run at CP=2 (and TP=2 x CP=2) has the losses of CP=1."""
from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed

S, B = 24, 2


def _forward_backward(model, ids, w, packed=None):
    from megatron_hybrid.forward import position_ids_for
    from megatron_hybrid.model import gather_logits

    model.zero_grad()
    logits = gather_logits(model(ids, position_ids_for(ids), None, packed_seq_params=packed))
    (logits.float() * w[:, :logits.shape[1]]).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _worker(rank, tp, cp, use_packed):
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_hybrid.parallel import initialize_distributed
    from tests.model_utils import build_loaded_model, reference_setup

    _, cfg, weights = reference_setup("base")
    g = torch.Generator().manual_seed(0)
    batch = 1 if use_packed else B
    ids = torch.randint(0, cfg.vocab_size, (batch, S), generator=g)
    w = torch.randn(batch, S, cfg.vocab_size, generator=g)
    packed = None
    if use_packed:
        cu = torch.tensor([0, 7, 16, S], dtype=torch.int32)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=9, max_seqlen_kv=9)
    initialize_distributed(tp, 1)  # reference: no CP (the other ranks are DP replicas)
    ref_logits, ref_grads = _forward_backward(build_loaded_model(cfg, weights, tp, 1), ids, w,
                                              packed)
    initialize_distributed(tp, 1, context_parallel_size=cp)
    model = build_loaded_model(cfg, weights, tp, 1, context_parallel_size=cp)
    r, n = ps.get_context_parallel_rank(), S // cp
    logits, grads = _forward_backward(model, ids[:, r * n:(r + 1) * n],
                                      w[:, r * n:(r + 1) * n], packed)
    group = ps.get_context_parallel_group()
    for t in grads.values():  # each CP rank holds its tokens' (and heads') share
        torch.distributed.all_reduce(t, group=group)
    dlogits = float((logits - ref_logits[:, r * n:(r + 1) * n]).abs().max())
    dgrad = max(float((grads[k] - ref_grads[k]).abs().max()) for k in ref_grads)
    scale = max(float(v.abs().max()) for v in ref_grads.values())
    return dlogits, dgrad, scale, sorted(grads) == sorted(ref_grads)


@pytest.mark.distributed
@pytest.mark.parametrize("tp,cp,use_packed", [(1, 2, False), (2, 2, False), (1, 2, True)])
def test_cp2_logits_and_gradients_equal_cp1(tp, cp, use_packed):
    for dlogits, dgrad, scale, same_keys in run_distributed(_worker, tp * cp, tp, cp, use_packed,
                                                            timeout=300):
        assert same_keys
        assert dlogits < 1e-5 and dgrad < 1e-5 * max(scale, 1.0), (dlogits, dgrad, scale)


def test_cp_that_does_not_divide_the_heads_is_refused():
    from megatron_hybrid.config import ConfigError, preset_config

    cfg = preset_config("olmo_hybrid_7b")
    cfg.validate_parallel(1, 1, 2)  # 30 heads: CP 2 at TP 1
    with pytest.raises(ConfigError, match="--context-parallel-size 2 x "
                                          "--tensor-model-parallel-size 2 = 4 does not divide"):
        cfg.validate_parallel(2, 1, 2)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,more", [(1, 1, []), (2, 1, ["--sequence-parallel"]),
                                         (1, 2, ["--intra-document-masking"])])
def test_training_at_cp2_has_the_losses_of_cp1(embedded_small, tp, pp, more):
    from tests.training.pretrain_kit import flags, last_stage_losses, pretrain_worker

    heads = ["--num-attention-heads", "4", "--kv-channels", "16", "--linear-num-key-heads", "4",
             "--linear-num-value-heads", "4", "--linear-key-head-dim", "8",
             "--linear-value-head-dim", "16"]  # TP x CP = 4 must divide the heads

    def losses(cp, extra=()):
        argv = flags(embedded_small, tp=tp, pp=pp, iters=3,
                     extra=["--context-parallel-size", str(cp), *heads, *more, *extra])
        return last_stage_losses(run_distributed(pretrain_worker, tp * pp * cp, argv, tp=tp, pp=pp,
                                                 timeout=300))

    one, two = losses(1), losses(2)
    print(f"[cp] TP={tp} PP={pp} {' '.join(more)}: losses CP1 {one}, CP2 {two}")
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 2e-5


@pytest.mark.slow
@pytest.mark.distributed
def test_cp2_checkpoint_resumes_at_cp1(embedded_small, tmp_path):
    from tests.training.pretrain_kit import flags, last_stage_losses, pretrain_worker

    ckpt = str(tmp_path / "ckpt")
    cp2 = flags(embedded_small, ckpt, iters=3, extra=["--context-parallel-size", "2",
                                                      "--exit-interval", "2"])
    def run(world, argv):
        return last_stage_losses(run_distributed(pretrain_worker, world, argv, timeout=300))

    head = run(2, cp2)
    tail = run(1, flags(embedded_small, ckpt, iters=3))
    whole = run(1, flags(embedded_small, iters=3))
    print(f"[cp] CP2 iterations 1-2 {head}, resumed at CP1: {tail}, CP1 throughout {whole}")
    assert len(head) == 2 and len(tail) == 1 and abs(tail[0] - whole[2]) < 2e-5
