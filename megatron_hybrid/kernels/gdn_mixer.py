"""The Gated DeltaNet mixer's kernel section, from the fused in_proj output to the gated norm.

Letters: S sequence length, B micro-batch, H / HV key / value heads held here, K / V key / value
head dims, C fused projection channels and C_conv conv channels (their segments:
``config/gdn_projection.py``), W conv kernel width.

One function so that the Megatron layer (``layers/gated_delta_net.py``) and the fla warm-up
(``runtime/fla_warmup.py``) launch exactly the same kernels with the same shapes, strides and dtypes: the
warm-up only helps when Triton sees identical calls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_hybrid.config.gdn_projection import GdnProjectionLayout

from . import gated_delta_rule, gated_rms_norm, short_conv

__all__ = ["gdn_mixer"]


def gdn_mixer(
    proj: torch.Tensor,
    conv_weight: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    *,
    key_head_dim: int,
    value_head_dim: int,
    allow_neg_eigval: bool = False,
    norm_eps: float = 1e-5,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Olmo Hybrid GDN steps 2-7 (docs/model.md §4): short conv + SiLU on [q; k; v], beta =
    sigmoid(b) (x2 with negative eigenvalues), g = -exp(A_log) softplus(a + dt_bias), the gated
    delta rule with L2-normalised q, k and scale K^-1/2, then the head-wise gated RMSNorm with z.

    Args:
        proj: [S, B, C] fused in_proj output, segments [q | k | v | z | b | a] (HF q,k,v,g,b,a_proj;
            ``config.gdn_projection.GdnProjectionLayout``).
        conv_weight: [C_conv, 1, W] or [C_conv, W] depthwise conv over [q | k | v].
        A_log, dt_bias: [HV]. norm_weight: [V] (shared by every head).
        key_head_dim, value_head_dim: K, V. norm_eps: the gated norm's epsilon (spec: 1e-5).
        cu_seqlens: LongTensor [N + 1] document offsets (B == 1): conv history and recurrent
            state restart at each document.
        backend: None (auto), "torch" or "fla" (see ``kernels.select_backend``).

    Returns:
        o [S, B, HV * V] in proj.dtype.

    Raises:
        ValueError: channel counts that do not match HV, K and V.
    """
    lay = _layout_of(proj.shape[-1], conv_weight.shape[0], A_log.numel(), key_head_dim,
                     value_head_dim)
    hv, vd = lay.num_value_heads, lay.value_dim
    x = proj.transpose(0, 1)                             # [B, S, C] (fla's layout)
    B, S = x.shape[:2]
    qkv, z, b, a = torch.split(x, list(lay.mixer_split_sizes()), dim=-1)
    qkv = short_conv(qkv, conv_weight, activation="silu", cu_seqlens=cu_seqlens, backend=backend)
    q, k, v = torch.split(qkv, list(lay.conv_sizes()), dim=-1)
    q = q.reshape(B, S, -1, key_head_dim)
    k = k.reshape(B, S, -1, key_head_dim)
    v = v.reshape(B, S, hv, value_head_dim)
    beta = torch.sigmoid(b.float())
    if allow_neg_eigval:
        beta = beta * 2.0
    beta = beta.to(q.dtype)
    g = -torch.exp(A_log.float()) * F.softplus(a.float() + dt_bias.float())
    o, _ = gated_delta_rule(q, k, v, g, beta, scale=key_head_dim ** -0.5, cu_seqlens=cu_seqlens,
                            use_qk_l2norm_in_kernel=True, backend=backend)
    o = gated_rms_norm(o, z.reshape(B, S, hv, value_head_dim), norm_weight, eps=norm_eps,
                       backend=backend)
    return o.reshape(B, S, vd).transpose(0, 1)          # [S, B, HV * V]


def _layout_of(proj_channels: int, conv_channels: int, hv: int, key_head_dim: int,
               value_head_dim: int) -> GdnProjectionLayout:
    """The projection layout of the heads held here, from the channel counts (H is not passed:
    it follows from the conv channel count, ``GdnProjectionLayout.conv_dim``).

    Raises:
        ValueError: channel counts that no whole number of key heads fits.
    """
    kd2 = conv_channels - hv * value_head_dim
    lay = None
    if kd2 > 0 and kd2 % (2 * key_head_dim) == 0:
        try:
            lay = GdnProjectionLayout(kd2 // (2 * key_head_dim), hv, key_head_dim, value_head_dim)
        except ValueError:
            lay = None
    if lay is None or proj_channels != lay.in_proj_dim:
        raise ValueError(f"gdn_mixer: proj channels {proj_channels} / conv channels {conv_channels} "
                         f"do not fit HV={hv}, K={key_head_dim}, V={value_head_dim}")
    return lay
