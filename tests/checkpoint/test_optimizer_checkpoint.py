"""Distributed-optimizer checkpoints (megatron_hybrid.checkpoint.optimizer): bugs A-D of
docs/megatron_core_notes.md §5 (and the dp_reshardable ones, B's variant and F) reproduce without their
fixes, and with them a torch_dist ``fully_reshardable`` checkpoint restores every fp32 main param
and Adam moment bit-exactly and resumes bit-exactly (same layout) or within 1e-5 (another TP/DP);
a ``dp_reshardable`` one does the same at the same layout and at another DP.

Layouts: GPT (local spec) TP2 x DP2 with 1,500-element DDP buckets (multi-bucket), reloaded at
TP2 x DP2 and at TP1 x DP1; the project's OlmoHybridModel (GDN + attention) PP2 x DP2 with tied
embeddings (the shared embedding gets its own bucket), reloaded at PP2 x DP2 and PP1.
"""
from __future__ import annotations

import os
import types

import pytest
import torch
from megatron.core.optimizer import distrib_optimizer

from megatron_hybrid.checkpoint import optimizer as oc
from tests.checkpoint import optim_kit as kit
from tests.dist import run_distributed

GPT = dict(kind="gpt", bucket_size=1500)  # ~10 buckets per rank
GPT_NON_DISTRIBUTED = dict(kind="gpt", distributed_optimizer=False)
OLMO = dict(kind="olmo", tied=True)       # PP2: shared embedding in its own bucket


DP = oc.DP_RESHARDABLE


def _trailing_alignment(model) -> bool:
    """Whether a bucket's numel_unpadded runs past its last param (what bug F trips over)."""
    for buffer in model.buffers:
        trimmed = oc._TrimmedBucketsBuffer(buffer)
        if any(t.numel_unpadded < b.numel_unpadded for t, b in zip(trimmed.buckets,
                                                                   buffer.buckets, strict=True)):
            return True
    return False


def _save_worker(rank, root, build_kwargs, tp, pp, distributed=True):
    """Train 3 steps, snapshot the optimizer, save 'fixed' and (distributed optimizer)
    'upstream_d' (fix D off) and 'dp' (dp_reshardable), train 3 more steps (the uninterrupted
    reference)."""
    try:
        model, optimizer = kit.build(tp=tp, pp=pp, **build_kwargs)
        kit.train(model, optimizer, range(3))
        snapshot = kit.optimizer_state(model, optimizer)
        kit.save(os.path.join(root, "fixed"), model, optimizer)
        if distributed:
            with kit.upstream("D"):
                kit.save(os.path.join(root, "upstream_d"), model, optimizer)
            kit.save(os.path.join(root, "dp"), model, optimizer, DP)
        losses, norms = kit.train(model, optimizer, range(3, 6))
        return dict(buckets=kit.num_buckets(model), snapshot=snapshot, losses=losses, norms=norms,
                    trailing_alignment=_trailing_alignment(model))
    finally:
        kit.release_writer_manager()


def _resume_worker(rank, path, build_kwargs, tp, pp, snapshot=None, fmt=oc.FULLY_RESHARDABLE):
    """Fresh model + optimizer, load `path`, compare the state, train the 3 resumed steps."""
    model, optimizer = kit.build(tp=tp, pp=pp, **build_kwargs)
    kit.load(path, model, optimizer, fmt)
    bad = None if snapshot is None else kit.state_mismatches(snapshot, kit.optimizer_state(
        model, optimizer))
    shared = kit.shared_step_tensors(optimizer)
    steps = sorted({float(s["step"]) for s in kit.optimizer_state(model, optimizer).values()})
    losses, norms = kit.train(model, optimizer, range(3, 6))
    return dict(bad=bad, shared=shared, steps=steps, losses=losses, norms=norms)


def _resume_worker_by_rank(rank, path, build_kwargs, tp, pp, snapshots, fmt=oc.FULLY_RESHARDABLE):
    return _resume_worker(rank, path, build_kwargs, tp, pp, snapshots[rank], fmt)


def _save_once(tmp_path_factory, name, build_kwargs, tp, pp):
    root = str(tmp_path_factory.mktemp(name))
    results = run_distributed(_save_worker, 4, root, build_kwargs, tp, pp, tp=tp, pp=pp)
    return root, results


@pytest.fixture(scope="module")
def gpt_tp2_dp2(tmp_path_factory):
    """GPT saved at TP2 x DP2, several buckets: (root, per-rank save results)."""
    root, results = _save_once(tmp_path_factory, "gpt_tp2_dp2", GPT, 2, 1)
    assert all(r["buckets"] == results[0]["buckets"] and r["buckets"][0] > 2 for r in results)
    return root, results


def _assert_same_run(got, want):
    assert got["losses"] == want["losses"], (got["losses"], want["losses"])
    assert got["norms"] == want["norms"], (got["norms"], want["norms"])


@pytest.mark.distributed
def test_multi_bucket_state_and_resume_bit_exact(gpt_tp2_dp2):
    root, saved = gpt_tp2_dp2
    got = run_distributed(_resume_worker_by_rank, 4, os.path.join(root, "fixed"), GPT, 2, 1,
                          [s["snapshot"] for s in saved], tp=2)
    for rank, (g, s) in enumerate(zip(got, saved, strict=True)):
        assert g["bad"] == {}, (rank, g["bad"])  # main params, exp_avg, exp_avg_sq, step
        assert g["shared"] == 0
        _assert_same_run(g, s)


def _bugs_worker(rank, root, snapshot):
    fixed = os.path.join(root, "fixed")
    out = {}
    # A: the load template of a fresh optimizer (torch Adam holds no state yet).
    model, optimizer = kit.build(tp=2, **GPT)
    model_sd = model.module.sharded_state_dict()
    try:
        optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=oc.SHARDING_METADATA)
        out["A"] = None
    except AssertionError as err:
        out["A"] = f"AssertionError {err}"
    out["A_fixed"] = type(oc.optimizer_sharded_state_dict(optimizer, model_sd, True)).__name__
    # B: fully_reshardable load without the step-free copy.
    with kit.upstream("B"):
        model, optimizer = kit.build(tp=2, **GPT)
        try:
            kit.load(fixed, model, optimizer)
            out["B"] = None
        except KeyError as err:
            out["B"] = f"KeyError {err}"
    # C: one shared step tensor after the load.
    with kit.upstream("C"):
        model, optimizer = kit.build(tp=2, **GPT)
        kit.load(fixed, model, optimizer)
        out["C_shared"] = kit.shared_step_tensors(optimizer)
        out["C_losses"], out["C_norms"] = kit.train(model, optimizer, range(3, 6))
    # D: a checkpoint saved without fix D, loaded with every fix.
    model, optimizer = kit.build(tp=2, **GPT)
    kit.load(os.path.join(root, "upstream_d"), model, optimizer)
    out["D_bad"] = kit.state_mismatches(snapshot[rank], kit.optimizer_state(model, optimizer))
    out["D_losses"], out["D_norms"] = kit.train(model, optimizer, range(3, 6))
    return out


@pytest.mark.distributed
def test_bugs_reproduce_without_their_fixes(gpt_tp2_dp2):
    root, saved = gpt_tp2_dp2
    got = run_distributed(_bugs_worker, 4, root, [s["snapshot"] for s in saved], tp=2)
    for g, s in zip(got, saved, strict=True):
        assert g["A"] is not None and g["A_fixed"] == "dict", g["A"]
        assert g["B"] == "KeyError 'step'", g["B"]
        # C: every param but one shares the first one's step tensor; the 1st resumed step is
        # still equal (same pre-update weights), the updates then use wrong bias corrections.
        assert g["C_shared"] > 0
        assert g["C_losses"][0] == s["losses"][0] and g["C_norms"][0] == s["norms"][0]
        assert g["C_norms"][1:] != s["norms"][1:], (g["C_norms"], s["norms"])
        # D: params behind the first padded bucket restored shifted / zero-padded.
        assert len(g["D_bad"]) > 0
        assert g["D_norms"] != s["norms"], (g["D_norms"], s["norms"])


def _dp_bugs_worker(rank, root):
    """dp_reshardable loads with upstream's B: fp32 params raise; where the copy goes through
    (bf16 models: the fp32 main params are no views of leaf params; shown here under no_grad)
    every step is reset to the load template's 0."""
    out = {}
    with kit.upstream("B"):
        model, optimizer = kit.build(tp=2, **GPT)
        try:
            kit.load(os.path.join(root, "dp"), model, optimizer, DP)
            out["B"] = None
        except RuntimeError as err:
            out["B"] = str(err)
        model, optimizer = kit.build(tp=2, **GPT)
        with torch.no_grad():
            kit.load(os.path.join(root, "dp"), model, optimizer, DP)
        out["B_steps"] = sorted({float(s["step"]) for s in kit.optimizer_state(
            model, optimizer).values()})
        out["B_losses"], out["B_norms"] = kit.train(model, optimizer, range(3, 6))
    return out


@pytest.mark.distributed
def test_dp_reshardable_multi_bucket_bit_exact_and_bug_b(gpt_tp2_dp2):
    root, saved = gpt_tp2_dp2
    path = os.path.join(root, "dp")
    got = run_distributed(_resume_worker_by_rank, 4, path, GPT, 2, 1,
                          [s["snapshot"] for s in saved], DP, tp=2)
    for rank, (g, s) in enumerate(zip(got, saved, strict=True)):
        assert g["bad"] == {} and g["shared"] == 0, (rank, g["bad"])
        _assert_same_run(g, s)
    bugs = run_distributed(_dp_bugs_worker, 4, root, tp=2)
    for b, s in zip(bugs, saved, strict=True):
        assert "a view of a leaf Variable" in b["B"], b["B"]
        assert b["B_steps"] == [0.0] and got[0]["steps"] == [3.0]
        assert b["B_losses"][0] == s["losses"][0] and b["B_norms"][1:] != s["norms"][1:]
    # DP 2 -> 1 (the one change dp_reshardable allows): the same run up to reduction order.
    (one, _) = run_distributed(_resume_worker, 2, path, GPT, 2, 1, None, DP, tp=2)
    assert one["steps"] == [3.0]
    for step in range(3):
        assert _close(one["losses"][step], saved[0]["losses"][step]), (one, saved[0])
    assert _close(one["norms"], saved[0]["norms"])


def _close(got, want, tol=1e-5):
    return len(got) == len(want) and all(abs(a - b) <= tol for a, b in zip(got, want, strict=True))


@pytest.mark.distributed
def test_reshard_tp2_dp2_to_tp1(gpt_tp2_dp2):
    root, saved = gpt_tp2_dp2
    (got,) = run_distributed(_resume_worker, 1, os.path.join(root, "fixed"), GPT, 1, 1)
    want = saved[0]
    for step in range(3):
        assert _close(got["losses"][step], want["losses"][step]), (got["losses"], want["losses"])
    assert _close(got["norms"], want["norms"]), (got["norms"], want["norms"])


@pytest.fixture(scope="module")
def olmo_pp2_dp2(tmp_path_factory):
    """OlmoHybridModel (tied) saved at PP2 x DP2: (root, per-rank save results)."""
    return _save_once(tmp_path_factory, "olmo_pp2_dp2", OLMO, 1, 2)


@pytest.mark.distributed
def test_pp2_tied_olmo_hybrid_state_and_resume(olmo_pp2_dp2):
    root, saved = olmo_pp2_dp2
    snapshots = [s["snapshot"] for s in saved]
    assert all(len(s["buckets"]) == 1 and s["buckets"][0] == 2 for s in saved), saved[0]
    fixed = run_distributed(_resume_worker_by_rank, 4, os.path.join(root, "fixed"), OLMO, 1, 2,
                            snapshots, pp=2)
    broken = run_distributed(_resume_worker_by_rank, 4, os.path.join(root, "upstream_d"), OLMO,
                             1, 2, snapshots, pp=2)
    for rank, (f, _b, s) in enumerate(zip(fixed, broken, saved, strict=True)):
        assert f["bad"] == {} and f["shared"] == 0, (rank, f["bad"])
        _assert_same_run(f, s)
    # Without fix D the first stage's tied embedding is saved from behind the padding.
    assert any(name.startswith("embedding.word_embeddings.weight")
               for b in broken for name in b["bad"]), [b["bad"] for b in broken]
    assert broken[-1]["norms"] != saved[-1]["norms"]
    # dp_reshardable: the first stage's bucket before the tied embedding ends in alignment
    # padding (bug F: upstream's save fails there); with fix F it resumes bit-exactly.
    assert saved[0]["trailing_alignment"]
    dp = run_distributed(_resume_worker_by_rank, 4, os.path.join(root, "dp"), OLMO, 1, 2,
                         snapshots, DP, pp=2)
    for rank, (d, s) in enumerate(zip(dp, saved, strict=True)):
        assert d["bad"] == {} and d["shared"] == 0, (rank, d["bad"])
        _assert_same_run(d, s)
    (_, last) = run_distributed(_resume_worker, 2, os.path.join(root, "dp"), OLMO, 1, 2, None, DP,
                                pp=2)
    assert _close(last["norms"], saved[-1]["norms"]), (last, saved[-1])  # PP2 x DP2 -> PP2 x DP1
    # PP2 x DP2 -> PP1 x DP1.
    (one,) = run_distributed(_resume_worker, 1, os.path.join(root, "fixed"), OLMO, 1, 1)
    for step in range(3):
        assert _close(one["losses"][step], saved[-1]["losses"][step]), (one, saved[-1])
    assert _close(one["norms"], saved[-1]["norms"])


@pytest.mark.distributed
def test_non_distributed_optimizer_tp2_to_tp1(tmp_path):
    """The same entry points pass a non-distributed optimizer through (its own format)."""
    root = str(tmp_path)
    saved = run_distributed(_save_worker, 2, root, GPT_NON_DISTRIBUTED, 2, 1, False, tp=2)
    (got,) = run_distributed(_resume_worker, 1, os.path.join(root, "fixed"),
                             GPT_NON_DISTRIBUTED, 1, 1)
    for step in range(3):
        assert _close(got["losses"][step], saved[0]["losses"][step]), (got, saved[0])
    assert _close(got["norms"], saved[0]["norms"])


# --- in-process unit tests -------------------------------------------------------------------
def test_unpadded_offsets_subtract_earlier_buckets_padding():
    """D: offsets lose the end padding of the earlier buckets of the same buffer."""
    p = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 30, 50)]
    bucket = lambda n: types.SimpleNamespace(numel_unpadded=n)  # noqa: E731
    buffer = types.SimpleNamespace(
        buckets=[bucket(100), bucket(94), bucket(50)],  # end padding 28, 34, 78
        bucket_indices=[(0, 128), (128, 256), (256, 384)],
        param_index_map={p[0]: (0, 100, 0), p[1]: (192, 222, 1), p[2]: (256, 306, 2)},
        numel_unpadded=244, extra="kept")
    view = oc._UnpaddedOffsetsBuffer(buffer)
    assert view.param_index_map == {p[0]: (0, 100, 0), p[1]: (164, 194, 1), p[2]: (194, 244, 2)}
    assert view.extra == "kept" and view.numel_unpadded == 244
    buffer.numel_unpadded = 200
    with pytest.raises(RuntimeError, match="exceeds"):
        oc._UnpaddedOffsetsBuffer(buffer)


def test_trimmed_buckets_end_at_their_last_param():
    """F: a bucket's numel_unpadded loses the alignment padding after its last param."""
    p = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 30, 50)]
    bucket = lambda n: types.SimpleNamespace(numel_unpadded=n, extra=n)  # noqa: E731
    buffer = types.SimpleNamespace(
        buckets=[bucket(192), bucket(50)],  # bucket 0: params end at 158, closed at 192
        bucket_indices=[(0, 256), (256, 384)],
        param_index_map={p[0]: (0, 100, 0), p[1]: (128, 158, 0), p[2]: (256, 306, 1)},
        numel_unpadded=242, other="kept")
    view = oc._TrimmedBucketsBuffer(buffer)
    assert [b.numel_unpadded for b in view.buckets] == [158, 50]
    assert [b.extra for b in view.buckets] == [192, 50] and view.other == "kept"


def test_fixes_idempotent_and_inert_with_te_or_apex(monkeypatch):
    oc.apply_distrib_optimizer_fixes()
    cls = distrib_optimizer.DistributedOptimizer
    first = {name: cls.__dict__[name] for name in oc._PATCHES}
    oc.apply_distrib_optimizer_fixes()
    assert {name: cls.__dict__[name] for name in oc._PATCHES} == first
    assert oc.fixes_applied() == {"B": True, "C": True, "D": True, "F": True}
    assert all(oc.UPSTREAM[n].__module__ == distrib_optimizer.__name__ for n in oc._PATCHES)
    # With TE/apex, B and C run upstream's code unchanged.
    calls = []
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    for name in ("_set_main_param_and_optimizer_states", "load_state_dict"):
        monkeypatch.setitem(oc.UPSTREAM, name, lambda *a, _n=name: calls.append(_n))
    fake = types.SimpleNamespace(optimizer=torch.optim.Adam([torch.nn.Parameter(torch.ones(1))]),
                                 config=types.SimpleNamespace(
                                     use_precision_aware_optimizer_no_fp8_or_ds_fp8=False))
    cls._set_main_param_and_optimizer_states(fake, None, {})
    cls.load_state_dict(fake, {})
    assert calls == ["_set_main_param_and_optimizer_states", "load_state_dict"]
