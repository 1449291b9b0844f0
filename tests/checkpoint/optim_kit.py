"""Helpers for the distributed-optimizer checkpoint tests: tiny models under megatron-core DDP +
distributed Adam, training steps, local optimizer-state snapshots, torch_dist save/load.

Two models: megatron-core's GPTModel on the local spec (tests/gpt_kit.py) and the
project's OlmoHybridModel (one GDN and one attention layer). Every rank sees the same tokens, so
any DP size computes the same update as DP=1 (resharding across DP compares like with like).
"""
from __future__ import annotations

import contextlib

import torch
from megatron.core import dist_checkpointing
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_hybrid.checkpoint import optimizer as oc
from megatron_hybrid.checkpoint.storage import ensure_checkpoint_dir
from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.model import OlmoHybridModel
from tests.gpt_kit import MICRO_BATCH, NUM_MICRO, SEQ, VOCAB, GPTKit

STATE_KEYS = ("param", "exp_avg", "exp_avg_sq", "step")


def gpt_module(tp: int, pp: int, tied: bool = False):
    """A 2-layer h64 GPTModel stage (tests/gpt_kit.py: local spec, RMSNorm, fp32, RoPE) and its
    config."""
    config = GPTKit.config(tp, pp)
    return GPTKit.build(config, tied=tied), config


def olmo_module(tp: int, pp: int, tied: bool = True):
    """The project's OlmoHybridModel, 2 layers ('G-*-': GDN + attention), h32, vocab 64."""
    cfg = OlmoHybridConfig(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, kv_channels=16,
        hybrid_layer_pattern="G-*-", linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=16, vocab_size=VOCAB,
        make_vocab_size_divisible_by=64, max_position_embeddings=SEQ,
        untie_embeddings_and_output_weights=not tied)
    config = cfg.to_transformer_config(tp, pp)
    return OlmoHybridModel(cfg, config), config


def build(kind: str = "gpt", tp: int = 1, pp: int = 1, bucket_size=None, tied: bool = False,
          distributed_optimizer: bool = True):
    """(DDP model, megatron optimizer) for this rank. bucket_size (elements) turns on
    overlap_grad_reduce, the only way megatron DDP keeps several buckets."""
    module, config = (gpt_module if kind == "gpt" else olmo_module)(tp, pp, tied)
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer,
        overlap_grad_reduce=bucket_size is not None, bucket_size=bucket_size)
    model = DistributedDataParallel(config, ddp_config, module=module)
    if bucket_size is not None:
        config.no_sync_func = model.no_sync
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=1.0, bf16=False,
                        use_distributed_optimizer=distributed_optimizer), [model])
    return model, optimizer


def num_buckets(model) -> list:
    """Buckets per buffer of this rank's DDP model."""
    return [len(b.buckets) for b in model.buffers]


def batches(step: int):
    """NUM_MICRO micro-batches for training step `step`, identical on every rank."""
    return GPTKit.batches(seed=1000 + step, num_micro=NUM_MICRO)


def train(model, optimizer, steps) -> tuple:
    """Run the training steps `steps` (an iterable of step numbers): (losses, grad norms).

    losses: per step, the micro-batch losses (last pipeline stage; [] on other stages).
    """
    losses, norms = [], []
    for step in steps:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=GPTKit._forward_step, data_iterator=iter(batches(step)), model=[model],
            num_microbatches=NUM_MICRO, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
            forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        assert ok
        losses.append([float(d["loss"]) for d in out])
        norms.append(float(grad_norm))
    return losses, norms


def optimizer_state(model, optimizer) -> dict:
    """{param name: {param, exp_avg, exp_avg_sq, step}}: clones of this rank's fp32 main-param
    shards and Adam state (distributed optimizer), keyed by the model's parameter names."""
    names = {p: n for n, p in model.module.named_parameters()}
    out = {}
    for opt in oc._distributed(optimizer):
        for param in opt.model_param_group_index_map:
            tensors = opt._get_main_param_and_optimizer_states(param)
            out[names[param]] = {k: tensors[k].detach().clone() for k in STATE_KEYS}
    return out


def state_mismatches(before: dict, after: dict) -> dict:
    """{name.key: max abs difference} of the entries that are not bit-identical."""
    bad = {}
    assert before.keys() == after.keys(), (sorted(before), sorted(after))
    for name, tensors in before.items():
        for key, value in tensors.items():
            other = after[name][key]
            if not torch.equal(value, other):
                bad[f"{name}.{key}"] = float((value.float() - other.float()).abs().max())
    return bad


def shared_step_tensors(optimizer) -> int:
    """How many param states share their `step` tensor with an earlier param (bug C)."""
    seen, shared = set(), 0
    for opt in oc._distributed(optimizer):
        for state in opt.optimizer.state.values():
            if id(state["step"]) in seen:
                shared += 1
            seen.add(id(state["step"]))
    return shared


def save(path: str, model, optimizer, fmt: str = oc.FULLY_RESHARDABLE) -> None:
    """torch_dist save of {'model', 'optimizer'} (format `fmt`) into `path` (created first;
    every rank)."""
    ensure_checkpoint_dir(path)
    model_sd = model.module.sharded_state_dict()
    dist_checkpointing.save(
        {"model": model_sd,
         "optimizer": oc.optimizer_sharded_state_dict(optimizer, model_sd, is_loading=False,
                                                      sharding_type=fmt)},
        path)
    torch.distributed.barrier()


def load(path: str, model, optimizer, fmt: str = oc.FULLY_RESHARDABLE) -> None:
    """Load model weights and optimizer state saved by `save` in format `fmt` (fully_reshardable:
    any TP/PP/DP; dp_reshardable: another DP)."""
    model_sd = model.module.sharded_state_dict()
    template = {"model": model_sd,
                "optimizer": oc.optimizer_sharded_state_dict(optimizer, model_sd,
                                                             is_loading=True, sharding_type=fmt)}
    state = dist_checkpointing.load(template, path)
    model.module.load_state_dict(state["model"], strict=False)
    oc.load_optimizer_state(optimizer, state["optimizer"])


@contextlib.contextmanager
def upstream(*letters: str):
    """Run the body with upstream's methods for the given fix letters (of "B", "C", "D", "F") and
    without the module's entry points re-applying them; restores the fixes on exit. Use it in a
    forked worker. (Fix A is shown by calling ``optimizer.sharded_state_dict`` directly.)"""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    oc.apply_distrib_optimizer_fixes()  # fills oc.UPSTREAM
    saved = {name: DistributedOptimizer.__dict__[name] for name in oc._PATCHES}
    saved_apply, saved_untie = oc.apply_distrib_optimizer_fixes, oc._untie_steps
    for name, fix in oc._PATCHES.items():
        if fix._megatron_hybrid_fix in letters:
            setattr(DistributedOptimizer, name, oc.UPSTREAM[name])
    oc.apply_distrib_optimizer_fixes = lambda: None
    if "C" in letters:
        oc._untie_steps = lambda opt: 0  # load_optimizer_state's post-load check too
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(DistributedOptimizer, name, fn)
        oc.apply_distrib_optimizer_fixes, oc._untie_steps = saved_apply, saved_untie


def release_writer_manager() -> None:
    """Shut down the spawn Manager that ``dist_checkpointing.save`` starts once per process
    (``filesystem_async._get_write_results_queue``). tests/dist.py ends ranks with ``os._exit``,
    which skips multiprocessing's exit finalizers: without this the Manager server outlives the
    test (holding pytest's stdout open)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = filesystem_async._results_queue
    filesystem_async._results_queue = None
    manager = getattr(queue, "_manager", None)
    if manager is not None:
        manager.shutdown()
