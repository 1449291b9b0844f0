"""Language-model loss with z-loss over vocab-parallel logits (spec ``docs/model.md`` §8).

Letters: B micro-batch, T sequence length, V padded vocabulary (V/TP rows per tensor-parallel rank).

    loss = mean_t CE(logits_t, label_t) + w * mean_t logsumexp(logits_t)^2

(the mean runs over tokens whose loss mask is 1). Both terms come from one fp32 softmax over the
vocab-parallel logits (max and exp-sum all-reduced over TP, as megatron-core's
``vocab_parallel_cross_entropy``), with an analytic backward.
Source: PaLM (Chowdhery et al. 2022, §5) z-loss; OLMo-core ``nn/functional/cross_entropy_loss.py``.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state


class _VocabParallelCrossEntropyAndLogSumExp(torch.autograd.Function):
    """Per-token cross-entropy and log-sum-exp over vocab-parallel logits, from one softmax.

    Forward: m = max over the full vocabulary (all-reduced MAX), e = exp(logits - m) in fp32,
    s = sum(e) (all-reduced), lse = log(s) + m, target logit gathered on the rank that holds
    the label (all-reduced), ce = lse - target. Only e (fp32) and s are saved.
    Backward: d/dlogits = e / s * (g_ce + g_lse) - onehot(label) * g_ce, computed in place in e.
    Megatron-core's cross-entropy plus a separate log-sum-exp made about five full fp32 passes
    over [tokens, V] each and saved two fp32 copies; this makes three and saves one.
    """

    @staticmethod
    def forward(ctx, logits, labels, group):
        v_local = logits.shape[-1]
        rank = 0 if group is None else torch.distributed.get_rank(group)
        m = logits.detach().max(dim=-1).values.float()
        if group is not None:
            torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
        e = (logits.detach() - m.unsqueeze(-1)).exp_()  # fp32 by type promotion: one pass, one copy
        s = e.sum(dim=-1)
        local = labels - rank * v_local
        in_range = (local >= 0) & (local < v_local)
        idx = torch.where(in_range, local, torch.zeros_like(local))
        target = torch.gather(logits, -1, idx.unsqueeze(-1)).squeeze(-1).float() * in_range
        if group is not None:
            torch.distributed.all_reduce(s, group=group)
            torch.distributed.all_reduce(target, group=group)
        lse = torch.log(s) + m
        ctx.save_for_backward(e, s, idx, in_range)
        ctx.dtype = logits.dtype
        return lse - target, lse

    @staticmethod
    def backward(ctx, g_ce, g_lse):
        e, s, idx, in_range = ctx.saved_tensors
        g_ce = torch.zeros_like(s) if g_ce is None else g_ce.float()
        g_lse = torch.zeros_like(s) if g_lse is None else g_lse.float()
        grad = e.mul_(((g_ce + g_lse) / s).unsqueeze(-1))
        grad.scatter_add_(-1, idx.unsqueeze(-1), (-g_ce * in_range).unsqueeze(-1))
        return grad.to(ctx.dtype), None, None


def vocab_parallel_cross_entropy_and_logsumexp(logits: torch.Tensor, labels: torch.Tensor
                                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, log-sum-exp) per token, fp32 [B, T] each, differentiable in both.

    Args:
        logits: [B, T, V/TP] (or [T, B, V/TP] with labels alike), this rank's vocabulary shard
            (rank r holds ids [r*V/TP, (r+1)*V/TP)); any float dtype, computed in fp32.
        labels: [B, T] int64 ids of the full vocabulary.
    """
    group = None
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        group = parallel_state.get_tensor_model_parallel_group()
    return _VocabParallelCrossEntropyAndLogSumExp.apply(logits, labels, group)


def lm_loss_with_z_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                        z_loss_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked mean cross-entropy plus weighted z-loss.

    Args:
        logits: [B, T, V/TP] vocab-parallel logits (any float dtype; computed in fp32).
        labels: [B, T] int64 target ids.
        loss_mask: [B, T] 0/1 (float or bool); tokens with 0 do not count.
        z_loss_weight: w >= 0 (0: the z term is not formed).

    Returns: (total, lm loss, z loss), fp32 scalars; total = lm + w * z carries the gradient.
    Raises: ValueError when the shapes disagree.
    """
    if logits.shape[:2] != labels.shape or labels.shape != loss_mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and "
                         f"loss_mask {tuple(loss_mask.shape)} must agree on [B, T]")
    mask = loss_mask.float()
    count = mask.sum().clamp(min=1.0)
    ce, lse = vocab_parallel_cross_entropy_and_logsumexp(logits, labels)
    lm = (ce * mask).sum() / count
    if z_loss_weight > 0:
        z = (lse.square() * mask).sum() / count
    else:
        z = torch.zeros((), device=logits.device)
    return lm + z_loss_weight * z, lm.detach(), z.detach()
