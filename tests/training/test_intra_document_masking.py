"""Intra-document masking (--reset-attention-mask --reset-position-ids): document offsets,
per-document attention against the dense block-diagonal mask, the varlen call for each torch
signature (stand-ins on CPU, FlashAttention on a GPU), a packed row's gradients against the
documents run one by one, and training at TP=2 x PP=2 against TP=1 x PP=1."""
from __future__ import annotations

import inspect

import pytest
import torch

from megatron_hybrid.layers.document_attention import (
    dense_document_mask,
    packed_causal_attention,
    varlen_call_spec,
    varlen_packed_attention,
)
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
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ga, gb, strict=True))


def _block_causal_reference(q, k, v, cu, scale):
    """Attention under a dense block-diagonal causal mask built token by token (independent of
    the module): token i sees j <= i of its own document; query head i reads K/V head
    i // (h / h_kv). q: [1, h, S, D], k, v: [1, h_kv, S, D] -> [1, h, S, D]."""
    S, h, hk = q.shape[2], q.shape[1], k.shape[1]
    doc = [d for d, (a, b) in enumerate(zip(cu[:-1], cu[1:], strict=True)) for _ in range(a, b)]
    allowed = torch.tensor([[doc[i] == doc[j] and j <= i for j in range(S)] for i in range(S)])
    heads = torch.tensor([i // (h // hk) for i in range(h)])
    scores = (q @ k[:, heads].transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v[:, heads]


def _kernel_stand_in(q, k, v, cu, causal, scale, gqa):
    """What a varlen kernel computes, on [T, h, D] tensors, one document at a time."""
    if k.shape[1] != q.shape[1]:
        if not gqa:  # torch 2.11's varlen_attn has no GQA option
            raise RuntimeError(f"stand-in kernel: {k.shape[1]} K/V heads for {q.shape[1]} queries")
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    assert causal, "the packed path must ask for causal masking"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        s = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * scale
        s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v[a:b]))
    return torch.cat(out)


CALLS = []


def varlen_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                      scale=None, window_size=(-1, -1)):
    """torch 2.11's varlen_attn signature (2.11.0+cu130, printed on the project's H100): no
    enable_gqa."""
    CALLS.append({"key_heads": key.shape[1], "window_size": window_size})
    return _kernel_stand_in(query, key, value, cu_seq_q, window_size == (-1, 0), scale, False)


def varlen_torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                      scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                      block_table=None, num_splits=None):
    """torch 2.13's varlen_attn signature (enable_gqa)."""
    CALLS.append({"key_heads": key.shape[1], "enable_gqa": enable_gqa})
    return _kernel_stand_in(query, key, value, cu_seq_q, window_size == (-1, 0), scale, enable_gqa)


def varlen_is_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    """An early preview's signature: is_causal, no scale, no GQA."""
    CALLS.append({"key_heads": key.shape[1], "is_causal": is_causal})
    return _kernel_stand_in(query, key, value, cu_seq_q, is_causal, None, False)


def _packed_inputs(h, hk, D=8, cu=(0, 5, 6, 15, 23), seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    S = cu[-1]
    q, k, v = (torch.randn(1, n, S, D, generator=g, dtype=torch.float64).to(device, dtype)
               .requires_grad_() for n in (h, hk, hk))
    return q, k, v, torch.tensor(cu)


@pytest.mark.parametrize("fn", [varlen_torch_2_11, varlen_torch_2_13, varlen_is_causal])
@pytest.mark.parametrize("hk", [4, 2, 1])
def test_varlen_call_passes_only_accepted_keywords_and_equals_block_causal_reference(fn, hk):
    q, k, v, cu = _packed_inputs(4, hk)
    CALLS.clear()
    out = varlen_packed_attention(fn, q, k, v, cu, 9, 8 ** -0.5)
    ref = _block_causal_reference(q, k, v, cu, 8 ** -0.5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ga = torch.autograd.grad((out * w).sum(), (q, k, v))
    gb = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert torch.allclose(out, ref, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ga, gb, strict=True))
    # K/V are expanded only for a signature without enable_gqa; with it they go in as they are
    assert CALLS[0]["key_heads"] == (hk if fn is varlen_torch_2_13 else 4)
    if fn is varlen_torch_2_13:
        assert CALLS[0]["enable_gqa"] == (hk != 4)


def test_varlen_call_spec_of_each_signature_and_of_the_installed_torch():
    assert varlen_call_spec(varlen_torch_2_11) == ({"window_size": (-1, 0)}, False, True)
    assert varlen_call_spec(varlen_torch_2_13) == ({"window_size": (-1, 0)}, True, True)
    assert varlen_call_spec(varlen_is_causal) == ({"is_causal": True}, False, False)
    assert varlen_call_spec(lambda q, k, v, cu_q, cu_k, mq, mk: q) is None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    installed = inspect.signature(varlen_attn)

    def stand_in(*args, **kwargs):  # binding raises TypeError for a keyword the real one lacks
        installed.bind(*args, **kwargs)
        CALLS.append(kwargs)
        return _kernel_stand_in(args[0], args[1], args[2], args[3],
                                kwargs.get("window_size") == (-1, 0) or kwargs.get("is_causal"),
                                kwargs.get("scale"), kwargs.get("enable_gqa", False))

    stand_in.__signature__ = installed
    q, k, v, cu = _packed_inputs(4, 2)
    CALLS.clear()
    out = varlen_packed_attention(stand_in, q, k, v, cu, 9, 8 ** -0.5)
    assert torch.allclose(out, _block_causal_reference(q, k, v, cu, 8 ** -0.5), atol=1e-12)
    assert set(CALLS[0]) <= set(installed.parameters)


def test_varlen_call_refuses_a_scale_it_cannot_pass_and_uneven_groups():
    q, k, v, cu = _packed_inputs(4, 4)
    with pytest.raises(ValueError, match="takes no scale"):
        varlen_packed_attention(varlen_is_causal, q, k, v, cu, 9, 0.5)
    q, k, v, cu = _packed_inputs(4, 3)
    with pytest.raises(ValueError, match="not a multiple"):
        varlen_packed_attention(varlen_torch_2_11, q, k, v, cu, 9, 8 ** -0.5)
    with pytest.raises(ValueError, match="enable_gqa"):
        packed_causal_attention(*_packed_inputs(4, 2), 8 ** -0.5)


def _relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hk", [8, 2])
def test_gpu_varlen_equals_per_document_sdpa_in_bf16(hk):
    """FlashAttention's varlen kernel (through this torch's signature) and the module's dispatch
    against SDPA run on each document alone: bf16 output and gradients within bf16 rounding of
    the fp32 per-document result, and no worse than bf16 per-document SDPA by more than 2x."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    print(f"torch {torch.__version__} varlen_attn{inspect.signature(varlen_attn)}")
    cu = (0, 1, 301, 318, 768, 1000)
    q, k, v, cu_t = _packed_inputs(8, hk, D=128, cu=cu, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(1, 8, cu[-1], 128, device="cuda", dtype=torch.bfloat16)

    def per_document_sdpa(q, k, v):
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=128 ** -0.5,
            enable_gqa=hk != 8) for a, b in zip(cu[:-1], cu[1:], strict=True)], dim=2)

    def run(f, *inputs):
        out = f(*inputs)
        return (out, *torch.autograd.grad((out.float() * w.float()).sum(), inputs))

    ref = run(per_document_sdpa, *(t.detach().float().requires_grad_() for t in (q, k, v)))
    sdpa = run(per_document_sdpa, q, k, v)
    for name, f in (("varlen", lambda q, k, v: varlen_packed_attention(
                        varlen_attn, q, k, v, cu_t, 450, 128 ** -0.5)),
                    ("dispatch", lambda q, k, v: packed_causal_attention(
                        q, k, v, cu_t, 128 ** -0.5, enable_gqa=hk != 8))):
        got = run(f, q, k, v)
        for i, (a, b, c) in enumerate(zip(got, sdpa, ref, strict=True)):
            err, base = _relative_error(a, c), _relative_error(b, c)
            print(f"[{name} h_kv={hk}] tensor {i}: rel err {err:.2e} (bf16 SDPA {base:.2e})")
            assert err < 2e-2 and err <= 2 * base + 1e-3, (name, i, err, base)


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
    for d, t in zip(docs, targets, strict=True):  # each document alone
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
