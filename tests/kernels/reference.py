"""Independent fp64 oracles for the kernels (per-token loops, no chunking, no shared code).

Letters: B batch, T tokens, H key heads, HV value heads (G = HV // H), K/V head dims, N sequences
(B, or documents with cu_seqlens), C channels, W conv width.

Gated delta rule, per token (docs/model.md §4 step 6):
    S <- e^g S;  delta = beta (v - S^T k);  S <- S + k delta^T;  o = S^T (scale q)
"""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ||a - b|| / ||b|| in fp64 (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    nb = b.norm().item()
    if nb == 0.0:
        return a.norm().item()
    return (a - b).norm().item() / nb


def _spans(B, T, cu_seqlens):
    """(batch row, start, end, state row) for every sequence/document."""
    if cu_seqlens is None:
        return [(b, 0, T, b) for b in range(B)]
    cu = [int(x) for x in cu_seqlens]
    return [(0, cu[n], cu[n + 1], n) for n in range(len(cu) - 1)]


def gdn_recurrent_reference(q, k, v, g, beta, *, scale=None, initial_state=None, cu_seqlens=None,
                            use_qk_l2norm=False):
    """Gated delta rule by an explicit per-token loop in fp64.

    q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; initial_state [N, HV, K, V] or None.
    Returns (o [B, T, HV, V] fp64, final_state [N, HV, K, V] fp64). Differentiable by autograd.
    """
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    head = torch.arange(HV) // (HV // H)  # value head j -> key head j // G
    if scale is None:
        scale = K ** -0.5
    if use_qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    rows = {}
    finals = []
    for b, s, e, n in _spans(B, T, cu_seqlens):
        if initial_state is None:
            S = torch.zeros(HV, K, V, dtype=torch.float64)
        else:
            S = initial_state[n].double()
        for t in range(s, e):
            kt = k[b, t][head]  # [HV, K]
            qt = q[b, t][head]
            S = torch.exp(g[b, t])[:, None, None] * S
            pred = torch.einsum("hkv,hk->hv", S, kt)
            delta = beta[b, t][:, None] * (v[b, t] - pred)
            S = S + kt[:, :, None] * delta[:, None, :]
            rows[(b, t)] = torch.einsum("hkv,hk->hv", S, scale * qt)
        finals.append(S)
    o = torch.stack([torch.stack([rows[(b, t)] for t in range(T)]) for b in range(B)])
    return o, torch.stack(finals)


def short_conv_reference(x, weight, *, activation="silu", cu_seqlens=None):
    """Causal depthwise conv by explicit loop in fp64: y[t,c] = act(sum_j w[c,j] x[t-W+1+j, c]),
    with zero history before each sequence / document. x [B, T, C]; weight [C, W] or [C, 1, W]."""
    x = x.double()
    w = weight.double().reshape(weight.shape[0], -1)
    B, T, C = x.shape
    W = w.shape[1]
    out = {}
    for b, s, e, _ in _spans(B, T, cu_seqlens):
        for t in range(s, e):
            acc = torch.zeros(C, dtype=torch.float64)
            for j in range(W):
                src = t - (W - 1) + j
                if src >= s:
                    acc = acc + w[:, j] * x[b, src]
            out[(b, t)] = acc * torch.sigmoid(acc) if activation in ("silu", "swish") else acc
    return torch.stack([torch.stack([out[(b, t)] for t in range(T)]) for b in range(B)])
