"""Intra-document masking (--reset-attention-mask --reset-position-ids): document offsets,
per-document attention against the dense block-diagonal mask, a packed row's gradients against
the documents run one by one, and training at TP=2 x PP=2 against TP=1 x PP=1."""
from __future__ import annotations

import pytest
import torch

from megatron_hybrid.layers.document_attention import dense_document_mask, packed_causal_attention
from megatron_hybrid.training.packing import document_offsets, pack_micro_batch
from tests.dist import run_distributed


def test_document_offsets_split_after_eod_and_at_sample_boundaries():
    eod = 2
    tokens = torch.tensor([[5, 2, 7, 8, 2, 9], [2, 4, 4, 4, 4, 2]])
    assert document_offsets(tokens, eod).tolist() == [0, 2, 5, 6, 7, 12]
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(2, 6)}
    packed, params = pack_micro_batch(batch, eod)
    assert packed["tokens"].shape == (1, 12) and torch.equal(packed["labels"][0, 6:], tokens[1] + 1)
    assert params.max_seqlen_q == 5 and params.cu_seqlens_q.dtype == torch.int32


@pytest.mark.parametrize("gqa", [False, True])
def test_packed_attention_equals_the_dense_document_mask(gqa):
    g = torch.Generator().manual_seed(0)
    h, hk, S, D = 4, 2 if gqa else 4, 23, 8
    q = torch.randn(1, h, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, hk, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, hk, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 5, 6, 15, 23])
    out = packed_causal_attention(q, k, v, cu, D ** -0.5, enable_gqa=gqa)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=dense_document_mask(cu, S), scale=D ** -0.5, enable_gqa=gqa)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((out * w).sum(), (q, k, v))
    gb = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert torch.allclose(out, ref, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ga, gb))


def _grad_worker(rank):
    from megatron_hybrid.forward import position_ids_for
    from megatron_hybrid.model import gather_logits
    from tests.model_utils import build_loaded_model, reference_setup

    _, cfg, weights = reference_setup("base")
    model = build_loaded_model(cfg, weights, 1, 1)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, cfg.vocab_size, (1, n), generator=g) for n in (9, 14, 7)]

    def loss_and_grads(logits, targets):
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 targets.reshape(-1), reduction="sum")
        model.zero_grad()
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}

    targets = [torch.roll(d, -1, 1) for d in docs]
    total, grads = 0.0, None
    for d, t in zip(docs, targets):  # each document alone
        l, gr = loss_and_grads(gather_logits(model(d, position_ids_for(d), None)), t)
        total += l
        grads = gr if grads is None else {n: grads[n] + gr[n] for n in grads}
    tokens = torch.cat(docs, 1)
    cu = torch.tensor([0, 9, 23, 30], dtype=torch.int32)
    from megatron.core.packed_seq_params import PackedSeqParams

    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=14,
                          max_seqlen_kv=14)
    packed_loss, packed_grads = loss_and_grads(
        gather_logits(model(tokens, position_ids_for(tokens), None, packed_seq_params=psp)),
        torch.cat(targets, 1))
    diff = max(float((packed_grads[n] - grads[n]).abs().max()) for n in grads)
    scale = max(float(grads[n].abs().max()) for n in grads)
    return abs(packed_loss - total), diff, scale


@pytest.mark.distributed
def test_packed_row_gradients_equal_documents_run_one_by_one():
    dloss, dgrad, scale = run_distributed(_grad_worker, 1)[0]
    assert dloss < 1e-4 and dgrad < 1e-5 * max(scale, 1.0), (dloss, dgrad, scale)


@pytest.fixture(scope="module")
def short_documents(embedded_small, tmp_path_factory):
    """A dataset of 8-24-token documents (several EODs in every 32-token sample)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_hybrid.data.tokenizer import build_tokenizer

    eod = build_tokenizer("SentencePieceTokenizer", embedded_small.tokenizer_model).eod
    prefix = str(tmp_path_factory.mktemp("short_docs") / "short_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    g = np.random.default_rng(0)
    for _ in range(400):
        n = int(g.integers(8, 25))
        doc = np.append(g.integers(3, embedded_small.vocab_size, n - 1), eod).astype(np.uint16)
        builder.add_document(doc, [n])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.mark.slow
@pytest.mark.distributed
def test_training_with_intra_document_masking_resumes_equal_at_tp2_pp2(embedded_small,
                                                                       short_documents,
                                                                       tmp_path):
    """One masked iteration at TP=1 saves; iteration 2 from that checkpoint is the same at
    TP=1 x PP=1 and TP=2 x PP=2 (same weights, pipeline and TP communication of the packed row),
    and differs without masking (the documents really are separated)."""
    from tests.training.pretrain_kit import flags, last_stage_losses, pretrain_worker, with_data_path

    mask = ["--intra-document-masking"]
    ckpt = str(tmp_path / "ckpt")
    base = with_data_path(flags(embedded_small, ckpt, iters=3,
                                extra=mask + ["--save-interval", "1"]), short_documents)
    first = last_stage_losses(run_distributed(pretrain_worker, 1, base, timeout=300))
    results = {}
    for name, tp, pp, extra in (("tp1", 1, 1, mask), ("tp2pp2", 2, 2, mask), ("plain", 1, 1, [])):
        run = str(tmp_path / name)
        import shutil

        shutil.copytree(ckpt, run)
        for it in ("iter_0000002", "iter_0000003"):
            shutil.rmtree(f"{run}/{it}")
        open(f"{run}/latest_checkpointed_iteration.txt", "w").write("1\n")
        argv = with_data_path(flags(embedded_small, run, tp=tp, pp=pp, iters=3, extra=extra),
                              short_documents)
        if not extra:
            argv.append("--override-opt-param-scheduler")
        results[name] = last_stage_losses(run_distributed(
            pretrain_worker, tp * pp, argv, tp=tp, pp=pp, timeout=300))
    print(f"[packing] iteration 2: uninterrupted {first[1]:.7f}, resumed {results}")
    assert abs(results["tp1"][0] - first[1]) < 1e-6
    assert abs(results["tp2pp2"][0] - first[1]) < 1e-5
    assert abs(results["plain"][0] - first[1]) > 1e-3
