"""Forward (and forward+backward) of an Olmo Hybrid model through megatron-core's pipeline schedules.

Letters: B batch, T sequence length, V vocabulary rows (padded; V/TP per rank before gathering).

Every pipeline stage calls these functions with the same arguments; the last stage gets the
results, the others get None. Used by ``tools/dump_logits.py`` and by the tests.
"""
from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_hybrid.model import gather_logits


def position_ids_for(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] positions 0..T-1 per sequence."""
    B, T = input_ids.shape
    return torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)


def _run(model, batches: list[dict], forward_only: bool, seq_length: int, micro_batch_size: int,
         loss_fn):
    def forward_step(data_iterator, model_chunk):
        batch = next(data_iterator)
        ids = batch["input_ids"]
        out = model_chunk(ids, position_ids_for(ids), None, labels=batch.get("labels"))
        return out, partial(loss_fn, batch)

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)


@torch.no_grad()
def forward_logits(model, input_ids: torch.Tensor, micro_batch_size: int | None = None,
                   vocab_size: int | None = None) -> torch.Tensor | None:
    """fp32 logits [B, T, V] (gathered over TP) on the last pipeline stage, None elsewhere.

    Args:
        input_ids: [B, T] int64, identical on every rank.
        micro_batch_size: split B into micro-batches of this size (default: B).
        vocab_size: keep only the first ``vocab_size`` rows (drop Megatron's padding).
    """
    model.eval()
    B, T = input_ids.shape
    mbs = micro_batch_size or B
    batches = [{"input_ids": input_ids[i:i + mbs]} for i in range(0, B, mbs)]

    def loss_fn(batch, logits):
        full = gather_logits(logits).float()
        if vocab_size is not None:
            full = full[..., :vocab_size]
        return torch.zeros((), device=full.device), {"logits": full}

    out = _run(model, batches, True, T, mbs, loss_fn)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat([o["logits"] for o in out])


def forward_backward_loss(model, input_ids: torch.Tensor, labels: torch.Tensor,
                          micro_batch_size: int | None = None) -> float | None:
    """Mean token cross-entropy over the batch with gradients accumulated into the parameters.

    Gradients land in ``param.grad`` (or ``main_grad`` under megatron DDP); each micro-batch's
    loss is the mean over its tokens, divided by the number of micro-batches by the schedule.
    Returns the mean loss on the last pipeline stage, None elsewhere.
    """
    model.train()
    B, T = input_ids.shape
    mbs = micro_batch_size or B
    batches = [{"input_ids": input_ids[i:i + mbs], "labels": labels[i:i + mbs]}
               for i in range(0, B, mbs)]

    def loss_fn(batch, per_token_loss):
        loss = per_token_loss.to(torch.promote_types(per_token_loss.dtype, torch.float32)).mean()
        return loss, {"loss": loss.detach()}

    out = _run(model, batches, False, T, mbs, loss_fn)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return float(torch.stack([o["loss"] for o in out]).mean())
