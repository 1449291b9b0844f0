"""Language-model loss with z-loss over vocab-parallel logits (spec ``olmo_hybrid.md`` §8).

Letters: B micro-batch, T sequence length, V padded vocabulary (V/TP rows per tensor-parallel rank).

    loss = mean_t CE(logits_t, label_t) + w * mean_t logsumexp(logits_t)^2

(the mean runs over tokens whose loss mask is 1). The cross-entropy is megatron-core's
``vocab_parallel_cross_entropy`` (fp32); the log-sum-exp is computed across TP ranks with an
all-reduce whose backward is the identity (each rank's exp-sum enters the total once).
Source: PaLM (Chowdhery et al. 2022, §5) z-loss; OLMo-core ``nn/functional/cross_entropy_loss.py``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (reduce_from_tensor_model_parallel_region,
                                           vocab_parallel_cross_entropy)


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the full (TP-split) vocabulary: [B, T, V/TP] -> [B, T], fp32, differentiable.

    The max is a constant for autograd (it cancels analytically); the exp-sums are all-reduced
    over the tensor-parallel group.
    """
    logits = logits.float()
    local_max = logits.detach().max(dim=-1).values
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_tensor_model_parallel_group())
    sum_exp = torch.exp(logits - local_max.unsqueeze(-1)).sum(dim=-1)
    sum_exp = reduce_from_tensor_model_parallel_region(sum_exp)
    return torch.log(sum_exp) + local_max


def lm_loss_with_z_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                        z_loss_weight: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked mean cross-entropy plus weighted z-loss.

    Args:
        logits: [B, T, V/TP] vocab-parallel logits (any float dtype; computed in fp32).
        labels: [B, T] int64 target ids.
        loss_mask: [B, T] 0/1 (float or bool); tokens with 0 do not count.
        z_loss_weight: w >= 0 (0 skips the log-sum-exp).

    Returns: (total, lm loss, z loss), fp32 scalars; total = lm + w * z carries the gradient.
    Raises: ValueError when the shapes disagree.
    """
    if logits.shape[:2] != labels.shape or labels.shape != loss_mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and "
                         f"loss_mask {tuple(loss_mask.shape)} must agree on [B, T]")
    mask = loss_mask.float()
    count = mask.sum().clamp(min=1.0)
    if z_loss_weight > 0:
        lse = vocab_parallel_logsumexp(logits)
        z = (lse.square() * mask).sum() / count
    else:
        z = torch.zeros((), device=logits.device)
    # megatron-core's CE takes [T, B, V/TP] or [B, T, V/TP] alike (it reduces the last dim) and
    # overwrites its fp32 input in place: never hand it the caller's tensor.
    x = logits.float()
    ce = vocab_parallel_cross_entropy(x.clone() if x is logits else x, labels)
    lm = (ce * mask).sum() / count
    return lm + z_loss_weight * z, lm.detach(), z.detach()
