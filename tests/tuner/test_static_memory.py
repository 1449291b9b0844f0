"""The tuner's weights / gradients / optimizer-state bytes per rank equal what the trainer
allocates: the `tiny` preset at TP=2 x PP=2 x DP=2 with the distributed optimizer, built by
`megatron_hybrid.model_setup` in 8 forked gloo ranks and stepped once (torch's AdamW creates its state
on the first step). Cases: bf16 (one bucket per stage), fp32 with --overlap-grad-reduce and a
small --ddp-bucket-size (several padded buckets on the first stage; fp32 main params are views),
bf16 without the distributed optimizer (full fp32 copies and moments on every rank), and tied
embeddings (the shared embedding and output weights get buckets of their own).

Context parallelism: TP=2 x CP=2 x DP=2 (the tiny preset's 4 heads allow CP x TP = 4) on 8 ranks,
where megatron-core shards the buffers and the distributed optimizer over DP x CP = 4 ranks.
"""
from __future__ import annotations

import megatron.core.parallel_state as ps
import pytest
import torch

from megatron_hybrid.config.arguments import model_config_from_args, parse_args
from megatron_hybrid.model_setup import setup_model_and_optimizer
from megatron_hybrid.tuner.params import static_memory
from tests.dist import run_distributed

BASE = ["--model-preset", "tiny", "--seq-length", "32", "--train-iters", "1", "--lr", "1e-3",
        "--mock-data", "--vocab-size", "8192",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
DO = "--use-distributed-optimizer"
CASES = {"bf16": ["--bf16", DO],
         "fp32_buckets": [DO, "--overlap-grad-reduce", "--ddp-bucket-size", "300000"],
         "bf16_no_distopt": ["--bf16"],
         "bf16_tied_buckets": ["--bf16", DO, "--tie-embeddings-and-output-weights",
                               "--overlap-grad-reduce", "--ddp-bucket-size", "500000"]}


def _storage_bytes(tensors, exclude=()) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _allocated(setup) -> dict:
    """Bytes of the parameter storage, the grad buffers, the fp32 main params (not views of the
    parameters) and Adam's two moments on this rank."""
    params = list(setup.model.module.parameters())
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    opts = getattr(setup.optimizer, "chained_optimizers", [setup.optimizer])
    mains, avg, avg_sq = [], [], []
    for opt in opts:
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                mains.append(p)
                state = opt.optimizer.state[p]
                avg.append(state["exp_avg"])
                avg_sq.append(state["exp_avg_sq"])
    return {"params": _storage_bytes(params), "grads": _storage_bytes(p.main_grad for p in params),
            "main_params": _storage_bytes(mains, exclude=param_ptrs),
            "exp_avg": _storage_bytes(avg), "exp_avg_sq": _storage_bytes(avg_sq)}


def _worker(rank, cases, base=BASE, cp=1):
    if cp > 1:  # run_distributed set up TP x PP; add CP (the model-parallel groups are rebuilt)
        from megatron_hybrid.parallel import initialize_distributed

        initialize_distributed(ps.get_tensor_model_parallel_world_size(),
                               ps.get_pipeline_model_parallel_world_size(),
                               context_parallel_size=cp)
    out = {"tp": ps.get_tensor_model_parallel_rank(), "pp": ps.get_pipeline_model_parallel_rank(),
           "cp": ps.get_context_parallel_rank(), "dp": ps.get_data_parallel_rank(),
           # the rank in DP x CP, which picks the distributed optimizer's shard
           "dp_cp": ps.get_data_parallel_rank(with_context_parallel=True)}
    for name, extra in cases.items():
        args = parse_args(base + extra, world_size=8)
        setup = setup_model_and_optimizer(args, model_config_from_args(args, 8192),
                                          torch.device("cpu"))
        setup.model.zero_grad_buffer()
        setup.optimizer.zero_grad()
        setup.optimizer.step()  # AdamW allocates exp_avg / exp_avg_sq here
        out[name] = _allocated(setup)
        out[name + "_buckets"] = sum(len(b.buckets) for b in setup.model.buffers)
    return out


def _assert_allocated_equals_predicted(name, rank_label, r, pred):
    """A rank's allocated bytes (and DDP bucket count) of case ``name`` equal the prediction."""
    got = r[name]
    print(f"{name} {rank_label}: allocated {got}; predicted params {pred.params} grads "
          f"{pred.grads} main {pred.main_params} exp_avg {pred.exp_avg} exp_avg_sq "
          f"{pred.exp_avg_sq}")
    assert got == {"params": pred.params, "grads": pred.grads, "main_params": pred.main_params,
                   "exp_avg": pred.exp_avg, "exp_avg_sq": pred.exp_avg_sq}, (name, r)
    assert r[name + "_buckets"] == pred.num_buckets


@pytest.mark.slow
@pytest.mark.distributed
def test_predicted_static_bytes_equal_the_allocated_ones():
    results = run_distributed(_worker, 8, CASES, tp=2, pp=2, timeout=300)
    assert sorted((r["tp"], r["pp"], r["dp"]) for r in results) == sorted(
        (t, p, d) for t in range(2) for p in range(2) for d in range(2))
    for name, extra in CASES.items():
        args = parse_args(BASE + extra, world_size=8)
        cfg = model_config_from_args(args, 8192)
        for r in results:
            pred = static_memory(cfg, 2, (4, 4), r["pp"], 2, r["dp"], bf16=args.bf16,
                                 distributed_optimizer=args.use_distributed_optimizer,
                                 overlap_grad_reduce=args.overlap_grad_reduce,
                                 ddp_bucket_size=args.ddp_bucket_size)
            _assert_allocated_equals_predicted(name, f"tp{r['tp']} pp{r['pp']} dp{r['dp']}", r, pred)
    # the fp32 case really has several buckets on the first stage, and shards differ by padding
    assert max(r["fp32_buckets_buckets"] for r in results) > 1


CP_BASE = ["--model-preset", "tiny", "--seq-length", "32", "--train-iters", "1", "--lr", "1e-3",
           "--mock-data", "--vocab-size", "8192", "--tensor-model-parallel-size", "2",
           "--pipeline-model-parallel-size", "1", "--context-parallel-size", "2",
           "--sequence-parallel"]
CP_CASES = {"bf16_cp2_buckets": ["--bf16", DO, "--overlap-grad-reduce", "--ddp-bucket-size",
                                 "300000"],
            "bf16_cp2_no_distopt": ["--bf16"]}


@pytest.mark.slow
@pytest.mark.distributed
def test_predicted_static_bytes_equal_the_allocated_ones_with_context_parallelism():
    results = run_distributed(_worker, 8, CP_CASES, CP_BASE, 2, tp=2, pp=1, timeout=300)
    assert sorted((r["tp"], r["cp"], r["dp"]) for r in results) == sorted(
        (t, c, d) for t in range(2) for c in range(2) for d in range(2))
    assert sorted(r["dp_cp"] for r in results) == [0, 0, 1, 1, 2, 2, 3, 3]
    for name, extra in CP_CASES.items():
        args = parse_args(CP_BASE + extra, world_size=8)
        assert args.data_parallel_size == 2
        cfg = model_config_from_args(args, 8192)
        for r in results:
            pred = static_memory(cfg, 2, (8,), 0, 2, r["dp_cp"], bf16=True,
                                 distributed_optimizer=args.use_distributed_optimizer,
                                 overlap_grad_reduce=args.overlap_grad_reduce,
                                 ddp_bucket_size=args.ddp_bucket_size, cp=2)
            _assert_allocated_equals_predicted(name, f"tp{r['tp']} cp{r['cp']} dp{r['dp']}", r, pred)
    # the shards are a quarter (DP x CP), not a half (DP) of the buffer
    r0 = results[0]["bf16_cp2_buckets"]
    half = static_memory(cfg, 2, (8,), 0, 2, 0, overlap_grad_reduce=True, ddp_bucket_size=300000)
    assert r0["exp_avg"] < 0.6 * half.exp_avg
