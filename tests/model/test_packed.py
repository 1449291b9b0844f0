"""Packed documents (cu_seqlens, B = 1): the logits of a packed row equal each document run alone,
for RoPE and NoPE, at TP=1 and at TP=2 with sequence parallelism (docs/model.md §4 'Packed documents')."""
from __future__ import annotations

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_hybrid.forward import position_ids_for
from megatron_hybrid.model import gather_logits
from tests.dist import run_distributed
from tests.model_utils import build_loaded_model, reference_setup

LENGTHS = [20, 30, 18]


def _worker(rank, variation, tp, sp, ids_docs):
    _, cfg, weights = reference_setup(variation)
    model = build_loaded_model(cfg, weights, tp, 1, sp).eval()
    with torch.no_grad():
        alone = [gather_logits(model(d, position_ids_for(d), None)) for d in ids_docs]
        packed_ids = torch.cat(ids_docs, dim=1)
        cu = torch.tensor([0] + list(torch.tensor(LENGTHS).cumsum(0)), dtype=torch.int32)
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                              max_seqlen_q=max(LENGTHS), max_seqlen_kv=max(LENGTHS))
        packed = gather_logits(model(packed_ids, position_ids_for(packed_ids), None,
                                     packed_seq_params=psp))
    return float((packed - torch.cat(alone, dim=1)).abs().max()), float(
        (packed[:, LENGTHS[0]:] - gather_logits(model(packed_ids, position_ids_for(packed_ids),
                                                      None))[:, LENGTHS[0]:]).abs().max())


@pytest.mark.parametrize("variation,tp,sp", [("base", 1, False), ("nope", 1, False),
                                             ("grouped_values", 2, True)])
def test_packed_equals_documents_alone(variation, tp, sp):
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, 256, (1, n), generator=g) for n in LENGTHS]
    if sp:  # sequence parallel splits the packed row: its length must divide by TP
        assert sum(LENGTHS) % tp == 0
    outs = run_distributed(_worker, tp, variation, tp, sp, docs, tp=tp)
    for err, unpacked_diff in outs:
        assert err <= 1e-5, f"packed vs documents alone: max |dlogits| {err:.2e}"
        assert unpacked_diff > 1e-3  # without cu_seqlens the documents do see each other
