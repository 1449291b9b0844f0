"""Intra-document masking: a micro-batch as one packed row with document offsets.

Letters: B micro-batch size, S sequence length, N documents in the packed row.

Megatron's ``--reset-attention-mask`` keeps attention inside each document of a sample (documents
end with the EOD token). Here the B samples of a micro-batch become one row of B*S tokens and
``cu_seqlens`` [N + 1] marks where documents start: after every EOD token and at every sample
boundary. The model's GDN layers then reset their recurrent state and conv history at each
offset, attention runs causally per document (varlen FlashAttention on GPU, per-document SDPA
otherwise) and RoPE positions restart per document (``--reset-position-ids``).
"""
from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def document_offsets(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """``cu_seqlens`` [N + 1] (int32) of the packed row of ``tokens`` [B, S].

    A document ends after each ``eod`` token and at the end of each sample; offsets are unique
    and run from 0 to B*S.
    """
    B, S = tokens.shape
    flat = tokens.reshape(-1)
    ends = (flat == eod).nonzero(as_tuple=True)[0] + 1
    bounds = torch.arange(0, B * S + 1, S, device=tokens.device)
    cu = torch.unique(torch.cat([bounds, ends]))
    return cu.to(torch.int32)


def pack_micro_batch(batch: dict[str, torch.Tensor], eod: int):
    """(batch with every [B, S] tensor reshaped to [1, B*S], PackedSeqParams with the offsets)."""
    cu = document_offsets(batch["tokens"], eod)
    packed = {k: (v.reshape(1, -1) if torch.is_tensor(v) and v.dim() == 2 else v)
              for k, v in batch.items()}
    longest = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    return packed, params


def schedule_shape(args):
    """(seq_length, micro_batch_size) the pipeline schedule communicates: [B*S, 1] when packed."""
    if getattr(args, "reset_attention_mask", False):
        return args.seq_length * args.micro_batch_size, 1
    return args.seq_length, args.micro_batch_size


def context_parallel_chunk(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This CP rank's contiguous 1/CP of every [B, S] tensor of ``batch`` (head-parallel CP,
    ``layers/context_parallel.py``: the mixers see the whole sequence after an all-to-all)."""
    from megatron.core import parallel_state

    cp = parallel_state.get_context_parallel_world_size()
    r = parallel_state.get_context_parallel_rank()
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() == 2:
            n = v.shape[1] // cp
            v = v[:, r * n:(r + 1) * n]
        out[k] = v
    return out
