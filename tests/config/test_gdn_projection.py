"""``config.gdn_projection.GdnProjectionLayout`` against the layout of docs/model.md §4.1 and §7,
written out here by hand: row indices of a full tensor whose row j holds the value j, the rank
interleave of §7 'Fused layouts' built from explicit offsets, and the 7B / 1B / tiny sizes from
the formulas (key_dim = H*Dk, value_dim = HV*Dv, in_proj = 2 key_dim + 2 value_dim + 2 HV, conv =
2 key_dim + value_dim)."""
from __future__ import annotations

import pickle

import pytest
import torch

from megatron_hybrid.config import preset_config
from megatron_hybrid.config.gdn_projection import (
    CONV_NAMES,
    HF_CONV_NAMES,
    HF_IN_PROJ_NAMES,
    IN_PROJ_NAMES,
    GdnProjectionLayout,
    interleaved_merge,
)

# grouped values (G = 2) so that key and value segments differ in size: H 4, HV 8, Dk 2, Dv 3
H, HV, DK, DV = 4, 8, 2, 3
LAY = GdnProjectionLayout(H, HV, DK, DV)


def _segments_by_hand():
    """(name, first global row, rows) of the in_proj segments, docs/model.md §4.1 table order."""
    kd, vd = H * DK, HV * DV
    out, start = [], 0
    for name, rows in (("q", kd), ("k", kd), ("v", vd), ("z", vd), ("beta", HV), ("alpha", HV)):
        out.append((name, start, rows))
        start += rows
    return out


def _rank_rows_by_hand(segments, rank, n):
    """Global rows of share ``rank`` of ``n``: the rank-th contiguous 1/n of every segment."""
    rows = []
    for _, start, size in segments:
        per = size // n
        rows += list(range(start + rank * per, start + (rank + 1) * per))
    return rows


@pytest.mark.parametrize("name,h,hv,dk,dv", [("olmo_hybrid_7b", 30, 30, 96, 192),
                                             ("olmo_hybrid_1b", 16, 16, 96, 192),
                                             ("tiny", 4, 4, 48, 96)])
def test_sizes_of_the_presets(name, h, hv, dk, dv):
    lay = GdnProjectionLayout.from_config(preset_config(name))
    assert (lay.num_key_heads, lay.num_value_heads, lay.key_head_dim, lay.value_head_dim) == (h, hv, dk, dv)
    assert lay.key_dim == h * dk and lay.value_dim == hv * dv
    assert lay.in_proj_dim == 2 * h * dk + 2 * hv * dv + 2 * hv
    assert lay.conv_dim == 2 * h * dk + hv * dv
    assert lay.in_proj_sizes() == (h * dk, h * dk, hv * dv, hv * dv, hv, hv)
    assert lay.conv_sizes() == (h * dk, h * dk, hv * dv)


def test_7b_numbers_of_the_spec():
    """docs/model.md §1 and §7: key_dim 2880, value_dim 5760, conv 11520, in_proj [17340, 3840];
    at TP 2 a rank holds 8670 rows."""
    lay = GdnProjectionLayout.from_config(preset_config("olmo_hybrid_7b"))
    assert (lay.key_dim, lay.value_dim, lay.conv_dim, lay.in_proj_dim) == (2880, 5760, 11520, 17340)
    assert sum(lay.in_proj_sizes(2)) == 8670
    assert lay.in_proj_sizes(2) == (1440, 1440, 2880, 2880, 15, 15)


def test_segment_names():
    """docs/model.md §4.1 (HF <-> MC names) and §7 (dist-checkpoint segments)."""
    assert IN_PROJ_NAMES == ("query", "key", "value", "z", "beta", "alpha")
    assert HF_IN_PROJ_NAMES == ("q_proj", "k_proj", "v_proj", "g_proj", "b_proj", "a_proj")
    assert CONV_NAMES == ("query", "key", "value")
    assert HF_CONV_NAMES == ("q_conv1d", "k_conv1d", "v_conv1d")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shard_and_merge_of_in_proj(tp):
    d = 5
    full = torch.arange(LAY.in_proj_dim, dtype=torch.float64)[:, None].repeat(1, d)  # row j = j
    segs = _segments_by_hand()
    assert segs[-1][1] + segs[-1][2] == LAY.in_proj_dim == 2 * 8 + 2 * 24 + 2 * 8
    shards = []
    for r in range(tp):
        got = LAY.tp_shard_in_proj(full, r, tp)
        want = torch.tensor(_rank_rows_by_hand(segs, r, tp), dtype=torch.float64)
        assert got.shape == (LAY.in_proj_dim // tp, d)
        assert torch.equal(got[:, 0], want) and torch.equal(got[:, -1], want)
        assert list(LAY.in_proj_sizes(tp)) == [s // tp for _, _, s in segs]
        shards.append(got)
    assert torch.equal(LAY.tp_merge_in_proj(shards), full)


def test_tp_shard_of_in_proj_keeps_whole_heads():
    """Rank r's q rows are the key heads [r H/TP, (r+1) H/TP), its v rows the value heads
    [r HV/TP, (r+1) HV/TP) (head-major channels, docs/model.md §4.1)."""
    full = torch.arange(LAY.in_proj_dim)
    tp = 2
    for r in range(tp):
        q, k, v, z, b, a = torch.split(LAY.tp_shard_in_proj(full, r, tp), list(LAY.in_proj_sizes(tp)))
        assert set((q // DK).tolist()) == set(range(r * H // tp, (r + 1) * H // tp))
        assert set(((v - 2 * H * DK) // DV).tolist()) == set(range(r * HV // tp, (r + 1) * HV // tp))
        assert set((b - 2 * H * DK - 2 * HV * DV).tolist()) == set(range(r * HV // tp, (r + 1) * HV // tp))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shard_and_merge_of_conv_and_heads(tp):
    w = 4
    conv = torch.arange(LAY.conv_dim, dtype=torch.float32)[:, None, None].repeat(1, 1, w)
    conv_segs = _segments_by_hand()[:3]
    shards = []
    for r in range(tp):
        got = LAY.tp_shard_conv(conv, r, tp)
        assert got.shape == (LAY.conv_dim // tp, 1, w)
        assert got[:, 0, 0].tolist() == _rank_rows_by_hand(conv_segs, r, tp)
        shards.append(got)
        heads = LAY.tp_shard_heads(torch.arange(HV), r, tp)
        assert heads.tolist() == list(range(r * HV // tp, (r + 1) * HV // tp))
    assert torch.equal(LAY.tp_merge_conv(shards), conv)


@pytest.mark.parametrize("tp,cp", [(1, 2), (2, 2), (1, 4), (2, 1)])
def test_cp_slices(tp, cp):
    """CP rank c keeps, of TP rank t's channels, the c-th contiguous 1/CP of each segment
    (the former ``context_parallel.head_slice``: items [c n / CP, (c+1) n / CP) of a segment of n): together
    that is share t*CP + c of TP*CP of the full tensor."""
    proj = torch.arange(LAY.in_proj_dim)
    conv = torch.arange(LAY.conv_dim)[:, None, None]
    segs = _segments_by_hand()
    for t in range(tp):
        local_proj = LAY.tp_shard_in_proj(proj, t, tp)
        local_conv = LAY.tp_shard_conv(conv, t, tp)
        local_heads = LAY.tp_shard_heads(torch.arange(HV), t, tp)
        for c in range(cp):
            # by hand: slice every TP-local segment with head_slice's formula
            want, off = [], 0
            for _, _, size in segs:
                n = size // tp
                want += local_proj[off + c * n // cp: off + (c + 1) * n // cp].tolist()
                off += n
            got = LAY.cp_shard_in_proj(local_proj[None, None], c, cp, tp)[0, 0]
            assert got.tolist() == want
            assert want == _rank_rows_by_hand(segs, t * cp + c, tp * cp)
            assert (LAY.cp_shard_conv(local_conv, c, cp, tp)[:, 0, 0].tolist()
                    == _rank_rows_by_hand(segs[:3], t * cp + c, tp * cp))
            hv_l = HV // tp
            assert (LAY.cp_shard_heads(local_heads, c, cp, tp).tolist()
                    == local_heads[c * hv_l // cp:(c + 1) * hv_l // cp].tolist())
    gpu = LAY.per_rank(tp * cp)
    assert (gpu.num_key_heads, gpu.num_value_heads) == (H // (tp * cp), HV // (tp * cp))


def test_mixer_split_puts_the_conv_channels_first():
    kd, vd = H * DK, HV * DV
    assert LAY.mixer_split_sizes() == (2 * kd + vd, vd, HV, HV)
    assert LAY.mixer_split_sizes(2) == ((2 * kd + vd) // 2, vd // 2, HV // 2, HV // 2)


def test_errors_name_the_sizes():
    with pytest.raises(ValueError, match="linear_num_value_heads 6 must be a multiple of linear_num_key_heads 4"):
        GdnProjectionLayout(4, 6, 2, 3)
    with pytest.raises(ValueError, match="linear_num_key_heads = 4 is not divisible by --tensor-model-parallel-size 3"):
        LAY.in_proj_sizes(3)
    with pytest.raises(ValueError, match="positive integer"):
        GdnProjectionLayout(0, 4, 2, 3)
    with pytest.raises(ValueError, match="segments"):
        LAY.tp_shard_in_proj(torch.zeros(LAY.in_proj_dim - 1, 2), 0, 2)
    with pytest.raises(ValueError, match="share"):
        LAY.tp_shard_in_proj(torch.zeros(LAY.in_proj_dim, 2), 2, 2)
    with pytest.raises(ValueError, match="segments"):
        interleaved_merge([torch.zeros(3), torch.zeros(4)], [4, 4])


def test_layout_is_frozen_and_picklable():
    with pytest.raises(AttributeError):
        LAY.num_key_heads = 2
    assert pickle.loads(pickle.dumps(LAY)) == LAY
