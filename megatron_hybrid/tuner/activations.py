"""Activation memory: the tensors autograd keeps per token, per layer kind (GPU path).

Letters (all local to one tensor-parallel rank t of TP): a bytes per activation element (2 under
``--bf16``, else 4); D hidden size; h = D/TP under sequence parallelism, else D (the hidden-width
tensors outside the mixers are split over the sequence); f = F/TP (FFN); qd = Ha*Dh/TP,
kvd = G*Dh/TP (attention query / key-value widths), ha = Ha/TP; kd = H*Dk/TP, vd = HV*Dv/TP,
hk = H/TP, hv = HV/TP (GDN); C = 64 the GDN chunk; v = V/TP (padded vocabulary).

Counted from first principles: what each op of the trainer's layers saves for backward, as
megatron-core 0.16 local modules, the project's layers (``layers/``) and fla 0.6.0 kernels run
on a GPU. The form follows Korthikanti et al., "Reducing Activation Recomputation in Large
Transformer Models" (2022), §4 (bytes per token per layer as a sum of saved tensors); the
attention core is torch SDPA with flash attention, so no S x S term appears.

- RMSNorm (``kernels.rms_norm`` on GPUs: fla's fused Triton RMSNorm): saves its input x and the
  fp32 rstd per row: a bytes per element + 4 per token. The attention's full-width QK-norms take
  the same kernel at TP 1; at TP > 1 they are torch ops (fp32 x and x*rstd: 8 bytes per element).
- Column/row-parallel linears save their input (under SP the local S/TP slice).
- SwiGLU (megatron ``MLP.glu``): fc1 output (kept by silu's saved view), silu output,
  ``x_linear + glu_linear_offset`` (a new tensor), and the product (fc2 input): 2f + 3f elements.
- GDN (``layers/gated_delta_net.py`` + fla 0.6.0): fla's ``causal_conv1d`` saves its input, a view
  of the in_proj output, which therefore stays alive whole; ``ChunkGatedDeltaRuleFunction`` saves
  the L2-normalised q and k (+ fp32 rstd), a contiguous copy of v, the chunk-cumsummed g (fp32),
  beta and A = (I + ...)^-1 [T, HV, C] and recomputes w, u, h in backward; fla's
  ``rms_norm_gated`` saves o and a contiguous copy of the gate z (+ rstd); out_proj saves its input.
  The fp32 gate math (sigmoid, softplus) saves 12 bytes per value head.
- Attention (``layers/olmo_attention.py``): linear_qkv output (kept whole by SDPA's saved view of
  v), full-width q/k RMSNorm (see RMSNorm above), RoPE'd q and k, SDPA's output
  and log-sum-exp (flash attention allocates its output in q's [S, B, H, Dh] memory layout, so
  the heads-merged input of linear_proj is a view of it, not a copy), the two post-norms.
  Selective recompute (Megatron ``core_attn``) drops only the log-sum-exp: linear_proj still
  keeps the attention output, and flash attention has no S x S term to save.
- Full recompute (uniform, one layer per checkpoint) keeps only each layer's input.
- Head: final norm, output-layer input, and over the vocabulary the loss's one fp32 ``exp``
  shared by the cross-entropy and the z-loss (``training/loss.py``): 4v bytes.
- Per GDN layer and micro-batch (not per token): the in_proj's zero-padded weight copy, kept for
  its backward (``layers/aligned_linear.py``), ``in_proj_pad_bytes``.

Context parallelism (CP, head-parallel all-to-all, ``layers/context_parallel.py``): every rank
holds a contiguous S/CP chunk, so norms, linears, the MLP and the head keep the bytes per token
above for S/CP tokens. Around each mixer an all-to-all gives the rank the whole sequence S for
heads/(TP*CP): a mixer tensor of width w/TP per token becomes S tokens x w/(TP*CP), i.e. the
same w/TP bytes per *local* token. So the terms are counted per local token (T = mbs * S/CP per
micro-batch, ``memory``) with the TP widths, and CP changes only:

- which tensor the conv (GDN) and SDPA's view of v (attention) keep alive: the all-to-all's output
  [S, B, C/(TP*CP)] instead of the in_proj / linear_qkv output (same size per local token);
- attention without selective recompute: SDPA keeps its output and linear_proj its input, which
  is now a copy (the output all-to-all's result), not a view: + a*qd;
- RoPE's cos/sin tables are made for the whole sequence (``model.py`` sets the rotary
  embedding's ``cp_group`` to None): x CP per local token;
- backward: the all-to-all of the mixer's input gradient holds its input and output at once
  (2a x the fused projection width per local token), a transient beside the others.

The all-to-all buffers of the forward are freed as soon as the mixer (or the next linear) has
consumed them, and none of them are kept for backward (``torch.distributed.nn`` saves no tensor).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.config.gdn_projection import GdnProjectionLayout

GDN_CHUNK = 64
#: (name, bytes per token on one rank)
Term = tuple[str, float]


@dataclass(frozen=True)
class LocalShapes:
    """Per-rank widths (elements per token) and the activation element size ``a`` (bytes);
    ``gdn_in``: the fused GDN in_proj width per rank (``config/gdn_projection.py``)."""

    a: int
    D: int
    h: float
    f: float
    qd: float
    kvd: float
    ha: float
    kd: float
    vd: float
    hk: float
    hv: float
    dk: int
    dv: int
    v: float
    dh: int = 128
    rope: bool = True
    cp: int = 1
    tp: int = 1
    gdn_in: float = 0.0


def local_shapes(cfg: OlmoHybridConfig, tp: int, sequence_parallel: bool,
                 bf16: bool = True, cp: int = 1) -> LocalShapes:
    """Widths of one TP rank's tensors; ``h`` is D/TP under sequence parallelism, else D;
    ``cp``: context-parallel size (widths are per local token, see the module docstring)."""
    D = cfg.hidden_size
    return LocalShapes(
        a=2 if bf16 else 4, D=D, h=D / tp if (sequence_parallel and tp > 1) else float(D),
        f=cfg.ffn_hidden_size / tp, qd=cfg.num_attention_heads * cfg.kv_channels / tp,
        kvd=cfg.num_query_groups * cfg.kv_channels / tp, ha=cfg.num_attention_heads / tp,
        kd=cfg.linear_num_key_heads * cfg.linear_key_head_dim / tp,
        vd=cfg.linear_num_value_heads * cfg.linear_value_head_dim / tp,
        hk=cfg.linear_num_key_heads / tp, hv=cfg.linear_num_value_heads / tp,
        dk=cfg.linear_key_head_dim, dv=cfg.linear_value_head_dim,
        v=cfg.padded_vocab_size / tp, dh=cfg.kv_channels,
        rope=cfg.position_embedding_type == "rope", cp=cp, tp=tp,
        gdn_in=GdnProjectionLayout.from_config(cfg).in_proj_dim / tp)


def _norm(s: LocalShapes) -> float:
    """RMSNorm over the hidden width with fla's fused kernel: its input x and the fp32 rstd."""
    return s.a * s.h + 4 * s.h / s.D


def _qk_norm(s: LocalShapes) -> float:
    """The full-width q and k RMSNorms: fla's kernel at TP 1 (x + rstd), torch fp32 ops at TP > 1
    (fp32 x and x*rstd: 8 bytes per element) with the all-reduced rstd."""
    if s.tp == 1:
        return s.a * (s.qd + s.kvd) + 8
    return 8 * (s.qd + s.kvd) + 8


def in_proj_pad_bytes(s: LocalShapes) -> float:
    """Bytes of the GDN in_proj's zero-padded weight copy per layer and micro-batch (its rows
    rounded up to 64, ``layers/aligned_linear.py``), kept for the backward; 0 when aligned."""
    n = s.gdn_in
    n_pad = -(-n // 64) * 64
    return 0.0 if n_pad == n else s.a * n_pad * s.D


def mlp_terms(s: LocalShapes) -> list[Term]:
    """SwiGLU MLP (megatron-core ``MLP`` without fusion): bytes per token."""
    a = s.a
    return [("mlp: fc1 input", a * s.h), ("mlp: fc1 output [gate|up]", 2 * a * s.f),
            ("mlp: silu(gate)", a * s.f), ("mlp: up + glu offset", a * s.f),
            ("mlp: fc2 input", a * s.f)]


def gdn_layer_terms(s: LocalShapes) -> list[Term]:
    """Saved bytes per token of a pre-norm GDN layer (fla kernels), no recompute."""
    a = s.a
    return [
        ("norm: input RMSNorm (x, rstd)", _norm(s)),
        ("gdn: in_proj input", a * s.h),
        ("gdn: in_proj output after the all-to-all (kept by the conv's saved view)" if s.cp > 1
         else "gdn: in_proj output (kept by the conv's saved view)",
         a * s.gdn_in),
        ("gdn: beta/decay gate math (fp32)", 12 * s.hv),
        ("gdn: q, k L2-normalised", a * 2 * s.kd),
        ("gdn: q, k rstd (fp32)", 8 * s.hk),
        ("gdn: v (contiguous copy)", a * s.vd),
        ("gdn: g chunk cumsum (fp32), beta", (4 + a) * s.hv),
        ("gdn: A = (I+KK^T)^-1 per chunk", a * GDN_CHUNK * s.hv),
        ("gdn: output norm o, gate z copy, rstd", 2 * a * s.vd + 4 * s.hv),
        ("gdn: out_proj input", a * s.vd),
        ("norm: pre-MLP RMSNorm", _norm(s)),
    ] + mlp_terms(s)


def attention_layer_terms(s: LocalShapes, selective: bool = False, mbs: int = 1) -> list[Term]:
    """Saved bytes per token of a post-norm attention layer (torch SDPA, flash).

    ``selective``: Megatron's selective recompute of the attention core (the log-sum-exp is not
    kept; q, k, v are, as the checkpoint's inputs, and the output, as linear_proj's input).
    ``mbs``: micro-batch size (RoPE's cos/sin tables [S, 1, 1, Dh], made per call for q and k,
    are shared by the micro-batch's sequences; under CP they span the whole sequence).
    """
    a = s.a
    qkv = ("attn: q|k|v after the all-to-all (kept by SDPA's view of v)" if s.cp > 1
           else "attn: linear_qkv output (kept by SDPA's view of v)")
    terms = [
        ("attn: linear_qkv input (layer input)", a * s.h),
        (qkv, a * (s.qd + 2 * s.kvd)),
        ("attn: q/k full-width RMSNorm", _qk_norm(s)),
        ("attn: q, k after RoPE", a * (s.qd + s.kvd)),
    ]
    if s.rope:
        terms.append(("attn: RoPE cos/sin tables (q and k" + (", whole sequence)" if s.cp > 1
                                                              else ")"),
                      4 * a * s.dh * s.cp / mbs))
    if not selective:
        terms.append(("attn: SDPA log-sum-exp (fp32)", 4 * s.ha))
    if s.cp > 1:
        if not selective:
            terms.append(("attn: SDPA output (before the output all-to-all)", a * s.qd))
        terms.append(("attn: linear_proj input (all-to-all output, a copy)", a * s.qd))
    else:
        terms.append(("attn: SDPA output = linear_proj input (a view)", a * s.qd))
    terms += [("norm: post-attention RMSNorm", _norm(s))]
    return terms + mlp_terms(s) + [("norm: post-MLP RMSNorm", _norm(s))]


def layer_terms(s: LocalShapes, kind: str, recompute: str, mbs: int = 1) -> list[Term]:
    """Saved bytes per token of one layer of ``kind`` (``"G"`` / ``"*"``) kept between its
    forward and backward, for ``recompute`` in {none, selective, full}, micro-batch ``mbs``."""
    if recompute == "full":
        return [("full recompute: layer input (checkpoint)", s.a * s.h)]
    if kind == "G":
        return gdn_layer_terms(s)
    return attention_layer_terms(s, selective=recompute == "selective", mbs=mbs)


def layer_bytes(s: LocalShapes, kind: str, recompute: str = "none", mbs: int = 1) -> float:
    """Sum of ``layer_terms``: bytes per token of one layer."""
    return sum(b for _, b in layer_terms(s, kind, recompute, mbs))


def layer_backward_transient(s: LocalShapes, kind: str) -> float:
    """Bytes per token allocated at once inside one layer's backward (beyond its saved tensors).

    GDN: fla's ``chunk_gated_delta_rule_bwd`` recomputes w, u, v_new and the chunk states h and
    builds dh, dv, dv2, dq, dk, dw, dk2 (bf16: 5 Dk + 5 Dv values per head plus two Dk x Dv
    states per chunk). Attention: flash backward dq, dk, dv plus its fp32 dq accumulator. MLP:
    the gradients of the fc1 output and of the GLU halves. CP: the backward all-to-all of the
    mixer's input gradient (its input and output, 2a x the fused projection width). The largest
    of the layer's ops counts. Bytes per local token (S/CP per sequence).
    """
    a = s.a
    mlp = a * 4 * s.f + 12 * s.h
    if kind == "G":
        core = a * s.hv * (5 * s.dk + 5 * s.dv + 2 * s.dk * s.dv / GDN_CHUNK)
        width = s.gdn_in
    else:
        core = a * (s.qd + 2 * s.kvd) + 4 * s.qd
        width = s.qd + 2 * s.kvd
    a2a = 2 * a * width if s.cp > 1 else 0.0
    return max(core, mlp, a2a)


def cp_all_to_all_widths(s: LocalShapes, kind: str) -> tuple[float, float]:
    """Elements per local token of the mixer's two all-to-alls on one rank: (input, output).

    GDN: the in_proj output C/TP = (2 H Dk + 2 HV Dv + 2 HV)/TP, then the value_dim/TP output;
    attention: q, k, v (qd + 2 kvd) and the qd output (``layers/context_parallel.py``).
    """
    if kind == "G":
        return s.gdn_in, s.vd
    return s.qd + 2 * s.kvd, s.qd


def head_terms(s: LocalShapes, z_loss: bool = True) -> list[Term]:
    """Saved bytes per token of the last stage's head: final norm, LM head input, loss (one fp32
    exp over the vocabulary serves the cross-entropy and the z-loss, ``training/loss.py``)."""
    return [("head: final RMSNorm", _norm(s)), ("head: output layer input", s.a * s.h),
            ("loss: exp(logits - max) (fp32), cross-entropy and z-loss", 4 * s.v),
            ("loss: targets, masks, per-token sums", 40.0)]


def head_transient(s: LocalShapes, z_loss: bool = True) -> float:
    """Extra bytes per token at the head's peak: at the end of the forward, the fp32 logits
    (Float16Module's output, 4v) next to the saved exp. The backward works in place in the exp
    buffer and adds only the bf16 logits gradient (2v). The same with or without z-loss."""
    return 4 * s.v
