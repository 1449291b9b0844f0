"""The fused GDN projection layout: the one place it is spelled out (spec ``docs/model.md`` §4.1, §7).

Letters: H / HV GDN key / value heads (HV = G*H), K / V key / value head dims, D hidden size,
key_dim = H*K, value_dim = HV*V, C = 2*key_dim + 2*value_dim + 2*HV the fused ``in_proj`` rows,
C_conv = 2*key_dim + value_dim the conv channels, W conv width, TP tensor-parallel size, r TP rank,
CP context-parallel size, c CP rank, n the number of shares a tensor is cut into.

The GDN mixer's six input projections are one column-parallel linear, ``in_proj`` [C, D], whose
rows are the segments [q; k; v; z; beta; alpha] (HF ``q_proj k_proj v_proj g_proj b_proj a_proj``;
MC's **z** is HF's ``g_proj``, the output gate, and the decay input is **alpha**, HF's ``a_proj``,
docs/model.md §7 'Fused layouts'), and the three short convs are one depthwise conv ``conv1d``
[C_conv, 1, W] over [q; k; v]. Channels are head-major inside every segment (docs/model.md §4.1).

- **TP** (docs/model.md §7): rank r holds the r-th contiguous 1/TP of *every* segment, in segment
  order, so a rank's tensor is itself a full layout of H/TP key and HV/TP value heads and the
  global tensor is interleaved by rank (``interleaved_shard`` / ``interleaved_merge``).
- **CP** (head-parallel all-to-all, ``layers/context_parallel.py``): CP rank c keeps, of its TP
  rank's channels, the c-th contiguous 1/CP of every segment (projection output, conv channels,
  A_log, dt_bias): the same rule one level down, H/(TP*CP) key heads per GPU.
- **Checkpoints** (dist checkpoint, docs/model.md §7): ``in_proj`` is stored as the segments
  ``.query .key .value .z .beta .alpha`` and ``conv1d`` as ``.query .key .value``, each in its
  global layout, so they reshard across TP unchanged.

Pure Python and torch: this module imports nothing of megatron-core or of the packages above
``config`` (docs/design.md §1).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["GdnProjectionLayout", "IN_PROJ_NAMES", "HF_IN_PROJ_NAMES", "CONV_NAMES",
           "HF_CONV_NAMES", "interleaved_shard", "interleaved_merge"]

#: in_proj segments in row order: the dist-checkpoint segment names (megatron-core's)
IN_PROJ_NAMES = ("query", "key", "value", "z", "beta", "alpha")
#: the same segments' HF tensors (``model.layers.{i}.linear_attn.<name>.weight``)
HF_IN_PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "g_proj", "b_proj", "a_proj")
#: conv1d segments in channel order: the dist-checkpoint segment names
CONV_NAMES = ("query", "key", "value")
#: the same segments' HF tensors as the release stores them (docs/model.md §6 trap 2)
HF_CONV_NAMES = ("q_conv1d", "k_conv1d", "v_conv1d")


def interleaved_shard(t: torch.Tensor, sizes: Sequence[int], rank: int, n: int,
                      dim: int = 0) -> torch.Tensor:
    """Share ``rank`` of ``n`` of a fused tensor: the rank-th contiguous 1/n of each segment.

    Args:
        t: [..., sum(sizes), ...] with the segments along ``dim`` in order.
        sizes: the segments' sizes along ``dim`` (each divisible by ``n``).
    Returns:
        [..., sum(sizes) / n, ...]: the shares of the segments, concatenated in segment order.
    Raises:
        ValueError: ``t`` does not have sum(sizes) entries along ``dim``, ``n`` does not divide
            a segment, or ``rank`` is outside [0, n).
    """
    _check_sizes(t.shape[dim], sizes, n, rank)
    return torch.cat([seg.chunk(n, dim=dim)[rank] for seg in torch.split(t, list(sizes), dim=dim)],
                     dim=dim)


def interleaved_merge(shards: Sequence[torch.Tensor], sizes: Sequence[int],
                      dim: int = 0) -> torch.Tensor:
    """Inverse of ``interleaved_shard``: the fused tensor from every share (in rank order).

    Args:
        shards: n tensors [..., sum(sizes) / n, ...].
        sizes: the segments' global sizes along ``dim``.
    Returns:
        [..., sum(sizes), ...].
    Raises:
        ValueError: a share of the wrong size, or ``len(shards)`` does not divide a segment.
    """
    n = len(shards)
    for s in shards:
        _check_sizes(s.shape[dim] * n, sizes, n, 0)
    local = [s // n for s in sizes]
    parts = [torch.split(s, local, dim=dim) for s in shards]
    return torch.cat([torch.cat([p[j] for p in parts], dim=dim) for j in range(len(sizes))],
                     dim=dim)


def _check_sizes(total: int, sizes: Sequence[int], n: int, rank: int) -> None:
    if total != sum(sizes):
        raise ValueError(f"fused tensor has {total} channels; its segments {list(sizes)} sum to "
                         f"{sum(sizes)}")
    if n < 1 or any(s % n for s in sizes) or not 0 <= rank < n:
        raise ValueError(f"cannot take share {rank} of {n} of segments {list(sizes)}: {n} must "
                         f"divide every segment and the share must be in [0, {n})")


@dataclass(frozen=True)
class GdnProjectionLayout:
    """The GDN ``in_proj`` [q; k; v; z; beta; alpha] and ``conv1d`` [q; k; v] layout of one model.

    Args:
        num_key_heads: H (``linear_num_key_heads``). num_value_heads: HV (a multiple of H).
        key_head_dim: K. value_head_dim: V.
    Raises:
        ValueError: a non-positive size, or HV not a multiple of H.
    """

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int

    def __post_init__(self):
        for name, v in self.__dict__.items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GdnProjectionLayout: {name} must be a positive integer, got {v!r}")
        if self.num_value_heads % self.num_key_heads:
            raise ValueError(f"linear_num_value_heads {self.num_value_heads} must be a multiple of "
                             f"linear_num_key_heads {self.num_key_heads}")

    @classmethod
    def from_config(cls, config) -> GdnProjectionLayout:
        """From any config with the ``linear_*`` shape fields (``OlmoHybridConfig``, or the
        megatron-core TransformerConfig built from it)."""
        return cls(config.linear_num_key_heads, config.linear_num_value_heads,
                   config.linear_key_head_dim, config.linear_value_head_dim)

    # -- sizes ------------------------------------------------------------------------------
    @property
    def key_dim(self) -> int:
        """H*K: channels of the q segment, and of the k segment."""
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        """HV*V: channels of the v segment, of the z segment, and of the mixer output."""
        return self.num_value_heads * self.value_head_dim

    @property
    def in_proj_dim(self) -> int:
        """C = 2*H*K + 2*HV*V + 2*HV: rows of the fused in_proj (17,340 for the 7B)."""
        return sum(self.in_proj_sizes())

    @property
    def conv_dim(self) -> int:
        """C_conv = 2*H*K + HV*V: channels of the fused conv1d (11,520 for the 7B)."""
        return sum(self.conv_sizes())

    def per_rank(self, n: int, flag: str = "--tensor-model-parallel-size") -> GdnProjectionLayout:
        """The layout one of ``n`` ranks holds: H/n key and HV/n value heads, same head dims.

        Args:
            n: TP for a TP rank, TP*CP for what one GPU computes under CP.
            flag: what ``n`` is, for the error message.
        Raises:
            ValueError: ``n`` does not divide H or HV.
        """
        for name, h in (("linear_num_key_heads", self.num_key_heads),
                        ("linear_num_value_heads", self.num_value_heads)):
            if n < 1 or h % n:
                raise ValueError(f"{name} = {h} is not divisible by {flag} {n}")
        return GdnProjectionLayout(self.num_key_heads // n, self.num_value_heads // n,
                                   self.key_head_dim, self.value_head_dim)

    def in_proj_sizes(self, tp: int = 1) -> tuple[int, ...]:
        """Rows of each in_proj segment (q, k, v, z, beta, alpha) on one of ``tp`` ranks:
        (H*K, H*K, HV*V, HV*V, HV, HV) / tp. Raises ValueError when tp does not divide the heads."""
        lay = self.per_rank(tp) if tp != 1 else self
        kd, vd, hv = lay.key_dim, lay.value_dim, lay.num_value_heads
        return (kd, kd, vd, vd, hv, hv)

    def conv_sizes(self, tp: int = 1) -> tuple[int, ...]:
        """Channels of each conv1d segment (q, k, v) on one of ``tp`` ranks: (H*K, H*K, HV*V) / tp."""
        return self.in_proj_sizes(tp)[:3]

    def mixer_split_sizes(self, tp: int = 1) -> tuple[int, int, int, int]:
        """The in_proj output [.., C/tp] cut as [conv input (q|k|v) | z | beta | alpha]: the conv
        channels come first, so the conv reads one contiguous block (docs/model.md §4.2)."""
        q, k, v, z, b, a = self.in_proj_sizes(tp)
        return (q + k + v, z, b, a)

    # -- tensor parallelism (full tensor <-> rank r) -----------------------------------------
    def tp_shard_in_proj(self, full: torch.Tensor, rank: int, tp: int, dim: int = 0) -> torch.Tensor:
        """Rank ``rank``'s in_proj rows: [C, D] -> [C/TP, D] = [q_r; k_r; v_r; z_r; beta_r; alpha_r]."""
        return interleaved_shard(full, self.in_proj_sizes(), rank, tp, dim)

    def tp_merge_in_proj(self, shards: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
        """Every rank's in_proj rows [C/TP, D] (rank order) -> the global [C, D]."""
        return interleaved_merge(shards, self.in_proj_sizes(), dim)

    def tp_shard_conv(self, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """Rank ``rank``'s conv channels: [C_conv, 1, W] -> [C_conv/TP, 1, W] = [q_r; k_r; v_r]."""
        return interleaved_shard(full, self.conv_sizes(), rank, tp)

    def tp_merge_conv(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Every rank's conv channels [C_conv/TP, 1, W] (rank order) -> the global [C_conv, 1, W]."""
        return interleaved_merge(shards, self.conv_sizes())

    def tp_shard_heads(self, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """Rank ``rank``'s rows of a per-value-head tensor (A_log, dt_bias): [HV] -> [HV/TP]."""
        return interleaved_shard(full, (self.num_value_heads,), rank, tp)

    # -- context parallelism (a TP rank's tensor -> CP rank c) ------------------------------
    def cp_shard_in_proj(self, local: torch.Tensor, cp_rank: int, cp: int, tp: int = 1,
                         dim: int = -1) -> torch.Tensor:
        """The channels CP rank ``cp_rank`` keeps of TP-local projection channels [.., C/TP] ->
        [.., C/(TP*CP)]. ``context_parallel.seq_to_heads(proj, layout.in_proj_sizes(tp))`` keeps
        exactly these channels (of the whole sequence) while it gathers the sequence."""
        return interleaved_shard(local, self.in_proj_sizes(tp), cp_rank, cp, dim)

    def cp_shard_conv(self, local: torch.Tensor, cp_rank: int, cp: int, tp: int = 1) -> torch.Tensor:
        """The conv channels CP rank ``cp_rank`` keeps: [C_conv/TP, 1, W] -> [C_conv/(TP*CP), 1, W]."""
        return interleaved_shard(local, self.conv_sizes(tp), cp_rank, cp)

    def cp_shard_heads(self, local: torch.Tensor, cp_rank: int, cp: int, tp: int = 1) -> torch.Tensor:
        """The heads CP rank ``cp_rank`` keeps of a TP-local A_log / dt_bias: [HV/TP] -> [HV/(TP*CP)]."""
        return interleaved_shard(local, (self.per_rank(tp).num_value_heads,), cp_rank, cp)
