"""Model, DDP, optimizer and LR scheduler for training, all from megatron-core (``docs/design.md`` §4).

* The model is ``OlmoHybridModel`` for this pipeline stage, built with ``use_cpu_initialization``
  (TP-invariant init), wrapped in ``Float16Module`` under ``--bf16`` (bf16 params and compute) and
  in megatron-core's ``DistributedDataParallel`` (fp32 gradient buffers, optional distributed
  optimizer and overlapped reduction).
* The optimizer is megatron-core's ``get_megatron_optimizer`` (Adam with decoupled weight decay,
  i.e. AdamW; fp32 main weights under bf16; global grad-norm clipping).
* Weight-decay grouping ``olmo`` (spec ``docs/model.md`` §8): every parameter is decayed except
  the input embedding (norms, A_log, dt_bias, convs and the LM head are decayed); ``megatron``:
  megatron-core's default (no decay on 1-D parameters and biases).
* The scheduler is megatron-core's ``OptimizerParamScheduler`` stepped once per iteration:
  linear warmup from ``--lr-warmup-init`` to ``--lr`` over ``--lr-warmup-iters``, then
  constant / linear / cosine decay to ``--min-lr`` at ``--lr-decay-iters``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.model import OlmoHybridModel

#: Parameter-name globs excluded from weight decay by the Olmo grouping (the input embedding;
#: with tied embeddings the last stage's copy of it is the output layer's weight).
OLMO_NO_DECAY_UNTIED = ("*embedding.word_embeddings.weight",)
OLMO_NO_DECAY_TIED = OLMO_NO_DECAY_UNTIED + ("*output_layer.weight",)


@dataclass
class TrainingSetup:
    """What ``setup_model_and_optimizer`` built."""

    model: DistributedDataParallel
    unwrapped: OlmoHybridModel
    optimizer: Any
    scheduler: OptimizerParamScheduler
    transformer_config: Any


def build_transformer_config(args, model_config: OlmoHybridConfig):
    """megatron-core TransformerConfig for the flags' layout, dtype and recompute settings."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    cpu_init = bool(getattr(args, "use_cpu_initialization", False)) or not torch.cuda.is_available()
    overrides: dict[str, Any] = dict(bf16=bool(args.bf16), use_cpu_initialization=cpu_init,
                                     context_parallel_size=args.context_parallel_size)
    if args.recompute_granularity is not None:
        overrides.update(recompute_granularity=args.recompute_granularity,
                         recompute_method=args.recompute_method,
                         recompute_num_layers=args.recompute_num_layers)
    return model_config.to_transformer_config(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel, params_dtype=dtype, **overrides)


def weight_decay_overrides(grouping: str, tied: bool) -> dict[ParamKey, dict] | None:
    """megatron-core ``config_overrides`` for a weight-decay grouping (``olmo`` / ``megatron``).

    Returns None for ``megatron`` (megatron-core's default grouping). Raises ValueError otherwise.
    """
    if grouping == "megatron":
        return None
    if grouping == "olmo":
        names = OLMO_NO_DECAY_TIED if tied else OLMO_NO_DECAY_UNTIED
        return {ParamKey(name=names): {"wd_mult": 0.0}}
    raise ValueError(f"--weight-decay-grouping {grouping!r}: expected 'olmo' or 'megatron'")


def build_optimizer_config(args) -> OptimizerConfig:
    """AdamW settings from the flags (betas, eps, decay, clipping, bf16 main weights)."""
    return OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=bool(args.bf16),
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=bool(args.use_distributed_optimizer),
        overlap_param_gather_with_optimizer_step=False)


def build_scheduler(args, optimizer) -> OptimizerParamScheduler:
    """Per-iteration LR schedule (warmup + ``--lr-decay-style`` to ``--min-lr``); constant WD."""
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.lr_decay_iters, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def setup_model_and_optimizer(args, model_config: OlmoHybridConfig,
                              device: torch.device) -> TrainingSetup:
    """Build the stage model, DDP wrapper, optimizer and scheduler for ``args``.

    Must run after ``initialize_distributed``. Raises ConfigError for a layout the model cannot
    run at (TP that does not divide the heads, ...).
    """
    tcfg = build_transformer_config(args, model_config)
    module = OlmoHybridModel(model_config, tcfg)
    unwrapped = module
    if device.type == "cuda":
        module = module.to(device)
    if args.bf16:
        module = Float16Module(tcfg, module)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=bool(args.overlap_grad_reduce),
        overlap_param_gather=bool(args.overlap_param_gather),
        use_distributed_optimizer=bool(args.use_distributed_optimizer),
        bucket_size=args.ddp_bucket_size)
    model = DistributedDataParallel(tcfg, ddp_config, module=module)
    optimizer = get_megatron_optimizer(
        build_optimizer_config(args), [model],
        config_overrides=weight_decay_overrides(
            args.weight_decay_grouping, not model_config.untie_embeddings_and_output_weights))
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.grad_scale_func = optimizer.scale_loss
    if args.overlap_grad_reduce:
        tcfg.no_sync_func = model.no_sync
        tcfg.grad_sync_func = model.start_grad_sync
    if args.overlap_param_gather:
        tcfg.param_sync_func = model.start_param_sync
    scheduler = build_scheduler(args, optimizer)
    return TrainingSetup(model, unwrapped, optimizer, scheduler, tcfg)


def param_groups_summary(optimizer) -> list[dict[str, Any]]:
    """[{'wd_mult', 'lr', 'num_params'}] per optimizer param group (for logs and tests)."""
    out = []
    for group in optimizer.param_groups:
        out.append({"wd_mult": group.get("wd_mult", 1.0), "lr": group.get("lr"),
                    "num_params": sum(p.numel() for p in group["params"])})
    return out
