"""Before the first iteration on GPUs: compile fla's autotune candidates for this run's GDN shapes
in parallel processes (``runtime/fla_warmup.py`` says why: minutes of serial Triton compiles).

Per node, local rank 0 warms Triton's on-disk cache, which the node's ranks share; the other ranks
wait at a barrier. It runs before the model is built: each worker process runs one GDN mixer at
the run's shapes on the local GPU (a CUDA context plus that layer's activations), so the GPU's
memory is still free then. ``--fla-warmup-workers 0`` turns it off; the default (None) takes
``MEGATRON_HYBRID_FLA_WARMUP_WORKERS`` or min(8, CPUs - 1) per node. A warm cache is recognised by
a stamp and costs nothing.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_hybrid.kernels import select_backend
from megatron_hybrid.parallel import print_rank_0
from megatron_hybrid.runtime.fla_warmup import GdnKernelShape, default_workers, warm_fla_kernels

__all__ = ["gdn_kernel_shapes", "training_gdn_shapes", "warm_up_kernels"]


def gdn_kernel_shapes(model_config, micro_batch_size: int, seq_length: int, dtype: str, tp: int = 1,
                      cp: int = 1, sequence_parallel: bool = False,
                      packed: bool = False) -> list[GdnKernelShape]:
    """The per-GPU GDN mixer shapes of a layout: micro-batch, whole sequence (context parallelism
    splits heads around the mixer), heads / (TP x CP), ``dtype`` ("bfloat16", ...), and the
    packed-document variant when ``packed`` (the micro-batch as one row; 4 equal documents stand
    for any count); plus the model RMSNorms' (rows, width): the hidden size over the rank's tokens,
    and at TP 1 the attention's QK-norm widths."""
    c = model_config
    rows = seq_length * micro_batch_size // cp
    norms = [(rows // tp if sequence_parallel else rows, c.hidden_size)]
    if tp == 1:  # the attention's QK-norms go through the same kernel at TP 1 (layers/norms.py)
        norms += [(rows, c.num_attention_heads * c.kv_channels), (rows, c.num_query_groups * c.kv_channels)]
    return [GdnKernelShape(
        batch=1 if packed else micro_batch_size, seq=seq_length * (micro_batch_size if packed else 1),
        key_heads=c.linear_num_key_heads // (tp * cp), value_heads=c.linear_num_value_heads // (tp * cp),
        key_head_dim=c.linear_key_head_dim, value_head_dim=c.linear_value_head_dim,
        conv_width=c.linear_conv_kernel_dim, dtype=dtype, documents=4 if packed else 0,
        allow_neg_eigval=bool(c.linear_allow_neg_eigval), norms=tuple(dict.fromkeys(norms)))]


def training_gdn_shapes(args, model_config) -> list[GdnKernelShape]:
    """``gdn_kernel_shapes`` of a training run's flags (``--reset-attention-mask`` packs)."""
    dtype = "bfloat16" if args.bf16 else ("float16" if getattr(args, "fp16", False) else "float32")
    return gdn_kernel_shapes(model_config, args.micro_batch_size, args.seq_length, dtype,
                             args.tensor_model_parallel_size, args.context_parallel_size,
                             bool(getattr(args, "sequence_parallel", False)),
                             bool(getattr(args, "reset_attention_mask", False)))


def warm_up_kernels(args, model_config, device: torch.device) -> None:
    """Run the parallel fla warm-up when this run uses fla on a GPU (see the module docstring)."""
    if device.type != "cuda" or select_backend(device) != "fla":
        return
    workers = default_workers() if args.fla_warmup_workers is None else args.fla_warmup_workers
    if workers <= 1:
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank == 0:
        report = warm_fla_kernels(training_gdn_shapes(args, model_config), workers=workers, device=device)
        if report["skipped"]:
            print(f" > fla kernel warm-up: skipped ({report['skipped']})", flush=True)
        else:
            failed = f", workers {report['failed']} failed" if report["failed"] else ""
            print(f" > fla kernel warm-up: {report['workers']} processes compiled fla's autotune "
                  f"candidates in {report['seconds']:.1f} s{failed}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    print_rank_0(" > fla kernel warm-up done")
