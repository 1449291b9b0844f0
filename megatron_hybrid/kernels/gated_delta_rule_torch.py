"""Pure-PyTorch chunked gated delta rule (WY / UT-transform form), differentiable by autograd.

Letters used in shapes:
    B   batch size
    T   tokens per sequence (the packed length when ``cu_seqlens`` is given, then B == 1)
    H   query/key heads
    HV  value heads, a multiple of H; value head j reads key head j // (HV // H)
    K   key head dim; V value head dim
    N   number of sequences: B, or the number of documents with ``cu_seqlens`` ([N + 1] offsets)
    C   chunk size (64); NC number of chunks; Tp = NC * C the padded length

Math (docs/model.md §4 step 6; Yang et al., "Gated Delta Networks", arXiv:2412.06464):
    S_t = e^{g_t} (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale * q_t)
with the state S in layout [K, V]. As steps: S <- e^g S; delta = beta (v - S^T k); S <- S + k delta^T.

Chunked form. Inside a chunk with start state S0, Gamma_t = exp(sum_{s<=t} g_s) (cumulative within the
chunk) and the decay matrix D_ts = Gamma_t / Gamma_s for s <= t (0 above the diagonal), the deltas solve
the unit lower-triangular system (UT transform, Yang et al. 2024, arXiv:2406.06484, "WY representation")
    (I + L) delta = beta v - (beta Gamma k) S0,    L_ts = beta_t D_ts k_t^T k_s  (s < t)
so delta = U - W S0 with U = (I + L)^{-1} (beta v) and W = (I + L)^{-1} (beta Gamma k), and
    O = scale [(Gamma q) S0 + (q k^T o D) delta],    S_C = Gamma_C S0 + (k o Gamma_C / Gamma)^T delta.
U, W and q k^T o D are computed for all chunks at once; only the state recurrence loops over chunks.
Every decay is exp of a non-positive sum of g (no division); the pairwise decays D_ts are summed
directly over (s, t] rather than as gc_t - gc_s, so strong decays neither overflow nor lose precision.

Packed documents (``cu_seqlens``) are laid out so that no chunk mixes two documents: each document is
zero-padded to a multiple of C, and the recurrence restarts from that document's ``initial_state`` row
at its first chunk. Zero padding (k = v = q = beta = 0, g = 0) leaves the state unchanged, so padding is
exact.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F

__all__ = ["chunk_gated_delta_rule_torch"]

_L2_EPS = 1e-6


def _l2norm_fp(x: torch.Tensor) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + 1e-6) over the last dim, in x's (already fp32/fp64) dtype (fla's l2norm)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + _L2_EPS)


def _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, chunk_size):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape; got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, _ = q.shape
    if v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, HV, V] with B={B}, T={T}; got {tuple(v.shape)}")
    HV = v.shape[2]
    if HV % H != 0:
        raise ValueError(f"value heads HV={HV} must be a multiple of key heads H={H}")
    for name, t in (("g", g), ("beta", beta)):
        if tuple(t.shape) != (B, T, HV):
            raise ValueError(f"{name} must be [B, T, HV] = {(B, T, HV)}; got {tuple(t.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens requires batch size 1 (packed documents); got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D [N + 1] with N >= 1; got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be an integer (LongTensor) tensor")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        want = (N, HV, k.shape[-1], v.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be [N, HV, K, V] = {want}; got {tuple(initial_state.shape)}")


def _doc_layout(cu: list[int], T: int, C: int, device: torch.device):
    """Chunk layout for packed documents: returns (dst [T] padded positions, NC, first, last, empty).

    ``first``/``last`` map a chunk index to the document that starts/ends there; ``empty`` lists
    zero-length documents (their final state is their initial state).
    """
    if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in pairwise(cu)):
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={T}; got {cu}")
    dst, first, last, empty, nc = [], {}, {}, [], 0
    for n, (a, b) in enumerate(pairwise(cu)):
        length = b - a
        if length == 0:
            empty.append(n)
            continue
        dst.append(torch.arange(length, device=device) + nc * C)
        cn = -(-length // C)
        first[nc], last[nc + cn - 1] = n, n
        nc += cn
    return torch.cat(dst), nc, first, last, empty


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """Segment sums [.., C] -> [.., C, C]: out[t, s] = sum_{s < r <= t} x[r] for t >= s, -inf above.

    Summed directly (masked cumsum, as Mamba-2's ``segsum``) rather than as a difference of cumulative
    sums, which loses precision when the cumulative decay is large (strong decays, long chunks).
    """
    C = x.shape[-1]
    incl = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()
    seg = x.unsqueeze(-1).expand(*x.shape, C).masked_fill(~incl.tril(-1), 0.0).cumsum(-2)
    return seg.masked_fill(~incl, float("-inf"))


def _to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, Tp, HV, ...] -> [B, HV, NC, C, ...] (contiguous)."""
    B, Tp, HV = x.shape[:3]
    x = x.reshape(B, Tp // C, C, HV, *x.shape[3:])
    perm = (0, 3, 1, 2) + tuple(range(4, x.dim()))
    return x.permute(*perm).contiguous()


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule in pure PyTorch (fp32 accumulation, autograd backward).

    Same contract as fla 0.6.0 ``chunk_gated_delta_rule`` with both beta flags False
    (docs/model.md §4 step 6 and §11; math in this module's docstring).

    Args:
        q: [B, T, H, K] queries (any float dtype).
        k: [B, T, H, K] keys.
        v: [B, T, HV, V] values; HV a multiple of H, value head j reads key head j // (HV // H).
        g: [B, T, HV] natural-log decay per token (<= 0), normally fp32; the decay factor is e^g.
        beta: [B, T, HV] write strength, already in (0, 2) (no sigmoid applied here).
        scale: query scale; default K ** -0.5.
        initial_state: [N, HV, K, V] start state (fp32), one row per sequence/document; zeros if None.
        output_final_state: also return the state after the last token of each sequence/document.
        cu_seqlens: LongTensor [N + 1] document offsets into T (requires B == 1); every document starts
            from its own ``initial_state`` row and never sees another document's tokens.
        use_qk_l2norm_in_kernel: L2-normalise q and k per head first, in fp32:
            x * rsqrt(sum(x^2) + 1e-6) (differentiable).
        chunk_size: chunk length C (any positive int; 64 as fla). T need not be a multiple of C.

    Returns:
        (o, final_state): o [B, T, HV, V] in q.dtype; final_state [N, HV, K, V] in the compute dtype
        (fp32, or fp64 when any of q, k, v is fp64) if ``output_final_state`` else None.

    Computation runs in fp32 (fp64 if any of q, k, v is fp64), whatever the input dtypes.

    Raises:
        ValueError: on inconsistent shapes, HV not a multiple of H, cu_seqlens with B != 1, malformed
            cu_seqlens (not starting at 0, decreasing, not ending at T) or an initial_state that is not
            [N, HV, K, V].
    """
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens, chunk_size)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    C = chunk_size
    cdt = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    scale = K ** -0.5 if scale is None else scale
    out_dtype = q.dtype
    (q, k, v, g, beta), dst, NC, first, last, empty = _chunk_layout(
        q, k, v, g, beta, cu_seqlens, C, cdt, use_qk_l2norm_in_kernel)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        h0 = initial_state.to(cdt)
    else:
        h0 = torch.zeros(N, HV, K, V, dtype=cdt, device=q.device)
    if NC == 0:  # no tokens at all
        o = torch.zeros(B, T, HV, V, dtype=out_dtype, device=q.device)
        return o, (h0.clone() if output_final_state else None)

    U, W, P, qg, kd, glast = _intra_chunk(q, k, v, g, beta, C, scale)
    states, deltas, final, finals = _state_recurrence(U, W, kd, glast, h0, first, last)
    finals.update({n: h0[n] for n in empty})
    oc = qg @ torch.stack(states, dim=2) + P @ torch.stack(deltas, dim=2)  # [B, HV, NC, C, V]

    o = oc.permute(0, 2, 3, 1, 4).reshape(B, NC * C, HV, V)
    o = o[:, :T] if dst is None else o.index_select(1, dst)
    o = o.to(out_dtype)
    if not output_final_state:
        return o, None
    if cu_seqlens is not None:
        final = torch.stack([finals[n] for n in range(N)], dim=0)
    return o, final


def _chunk_layout(q, k, v, g, beta, cu_seqlens, C: int, cdt: torch.dtype, l2norm: bool):
    """Inputs in the compute dtype, key heads repeated to HV, laid out in whole chunks of C tokens.

    Without ``cu_seqlens`` the sequence is zero-padded to a multiple of C; with it every document
    starts a chunk (``_doc_layout``). Returns ((q, k, v, g, beta) [B, NC*C, ...], dst (token ->
    chunked position, or None), NC, first {chunk: document starting there}, last {chunk: document
    ending there}, empty (documents without tokens)).
    """
    T, H, HV = q.shape[1], q.shape[2], v.shape[2]
    G = HV // H
    q, k = q.to(cdt), k.to(cdt)
    if l2norm:
        q, k = _l2norm_fp(q), _l2norm_fp(k)
    if G > 1:
        q, k = q.repeat_interleave(G, dim=2), k.repeat_interleave(G, dim=2)
    v, g, beta = v.to(cdt), g.to(cdt), beta.to(cdt)
    if cu_seqlens is None:
        pad = (-T) % C
        if pad:
            q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
            g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
        NC = (T + pad) // C
        return ((q, k, v, g, beta), None, NC, {0: None} if NC else {}, {NC - 1: None} if NC else {},
                [])
    dst, NC, first, last, empty = _doc_layout(cu_seqlens.tolist(), T, C, q.device)

    def scatter(x):
        buf = x.new_zeros((1, NC * C) + tuple(x.shape[2:]))
        return buf.index_copy(1, dst, x)

    return tuple(scatter(x) for x in (q, k, v, g, beta)), dst, NC, first, last, empty


def _intra_chunk(q, k, v, g, beta, C: int, scale: float):
    """The parts within each chunk, all chunks at once (this module's docstring, WY form).

    Returns U [B, HV, NC, C, V], W [B, HV, NC, C, K], P [B, HV, NC, C, C] (causal, diagonal
    included), qg = q Gamma scale [B, HV, NC, C, K], kd = (k_s Gamma_C / Gamma_s)^T
    [B, HV, NC, K, C] and Gamma_C [B, HV, NC, 1, 1].
    """
    qc, kc, vc = _to_chunks(q, C), _to_chunks(k, C), _to_chunks(v, C)
    gch = _to_chunks(g, C)  # [B, HV, NC, C]
    gc = gch.cumsum(-1)  # cumulative log decay within the chunk
    bc = _to_chunks(beta, C)
    decay = torch.exp(_segsum(gch))  # D_ts = exp(sum_{s<r<=t} g_r), 0 above the diagonal
    gam = torch.exp(gc).unsqueeze(-1)  # Gamma_t, [.., C, 1]
    L = torch.tril(bc.unsqueeze(-1) * (kc @ kc.transpose(-1, -2)) * decay, diagonal=-1)
    rhs = torch.cat([bc.unsqueeze(-1) * vc, bc.unsqueeze(-1) * gam * kc], dim=-1)  # [.., C, V + K]
    uw = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)  # diag of L ignored (= 1)
    V = v.shape[-1]
    P = (qc @ kc.transpose(-1, -2)) * decay * scale  # [.., C, C], causal incl. diagonal
    kd = (kc * decay[..., -1, :].unsqueeze(-1)).transpose(-1, -2)  # k_s Gamma_C / Gamma_s, [.., K, C]
    glast = torch.exp(gc[..., -1:]).unsqueeze(-1)  # Gamma_C, [B, HV, NC, 1, 1]
    return uw[..., :V], uw[..., V:], P, qc * gam * scale, kd, glast


def _state_recurrence(U, W, kd, glast, h0, first: dict, last: dict):
    """The state recurrence over chunks: S_{i+1} = Gamma_C S_i + kd_i (U_i - W_i S_i).

    Returns (states entering each chunk [B, HV, K, V] per chunk, deltas U_i - W_i S_i per chunk,
    the final state of an unpacked batch (or None), {document: final state [HV, K, V]}).
    """
    # unbind once: indexing a chunk inside the loop would make autograd build a full-size gradient per chunk
    Us, Ws, kds, gls = U.unbind(2), W.unbind(2), kd.unbind(2), glast.unbind(2)
    states, deltas, finals = [], [], {}
    S = final = None
    for i in range(len(Us)):
        if i in first:
            n = first[i]
            S = h0 if n is None else h0[n:n + 1]
        delta = Us[i] - Ws[i] @ S  # [B, HV, C, V]
        states.append(S)
        deltas.append(delta)
        S = gls[i] * S + kds[i] @ delta
        if i in last:
            n = last[i]
            if n is None:
                final = S
            else:
                finals[n] = S[0]
    return states, deltas, final, finals
