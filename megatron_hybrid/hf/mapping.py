"""Hugging Face ``olmo_hybrid`` <-> Megatron state-dict mapping (spec ``docs/model.md`` §6-§7).

Three layouts appear here:

- HF: the released tensor names (``model.layers.{i}.linear_attn.q_proj.weight``, ...).
- Megatron *global*: the project's Megatron key names (one table below) with global layer
  indices and TP=1 tensors; this is what a dist checkpoint stores (fused tensors are stored as
  their named segments, which is the same thing at TP=1).
- Megatron *local*: one rank's ``model.state_dict()``: layer indices local to the pipeline stage,
  tensors sliced for the TP rank (fused tensors interleaved per rank, docs/model.md §7).

Letters: d hidden, H/HV GDN key/value heads, Dk/Dv their head dims, Ha attention heads, G key/value
groups, Dh head dim, F FFN width, V vocabulary rows, TP tensor-parallel size, r TP rank.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from megatron_hybrid.config import ConfigError, OlmoHybridConfig
from megatron_hybrid.config.gdn_projection import (
    HF_CONV_NAMES,
    HF_IN_PROJ_NAMES,
    GdnProjectionLayout,
    interleaved_merge,
    interleaved_shard,
)
from megatron_hybrid.config.layout import GDN, pattern_from_hf_layer_types

Tensor = torch.Tensor

# HF key suffix (after ``model.layers.{i}.``) -> Megatron key suffix (after ``decoder.layers.{i}.``)
GDN_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "linear_attn.A_log": "self_attention.A_log",
    "linear_attn.dt_bias": "self_attention.dt_bias",
    "linear_attn.o_norm.weight": "self_attention.out_norm.weight",
    "linear_attn.o_proj.weight": "self_attention.out_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
ATTN_SIMPLE = {
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "post_self_attn_layernorm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
# aliases seen in the wild (docs/model.md §6 trap 3): applied before interpretation
LAYER_ALIASES = {
    "attention_layer_norm.weight": "input_layernorm.weight",
    "feedforward_layer_norm.weight": "post_attention_layernorm.weight",
    "linear_attn.out_proj.weight": "linear_attn.o_proj.weight",
    "linear_attn.norm.weight": "linear_attn.o_norm.weight",
}


def config_from_hf(hf: dict, make_vocab_size_divisible_by: int = 128) -> OlmoHybridConfig:
    """OlmoHybridConfig from an HF ``config.json`` dict (missing-key defaults of docs/model.md §6).

    Raises: ConfigError for a ``model_type`` other than ``olmo_hybrid`` or a bad ``layer_types``.
    """
    if hf.get("model_type") != "olmo_hybrid":
        raise ConfigError(f"config.json model_type is {hf.get('model_type')!r}; expected "
                          f"'olmo_hybrid'")
    n, d = hf["num_hidden_layers"], hf["hidden_size"]
    heads = hf["num_attention_heads"]
    layer_types = hf.get("layer_types") or [
        "full_attention" if (i % 4 == 3 or (n < 4 and i == n - 1)) else "linear_attention"
        for i in range(n)]  # transformers' default
    if len(layer_types) != n:
        raise ConfigError(f"config.json layer_types has {len(layer_types)} entries but "
                          f"num_hidden_layers is {n}")
    theta = _rope_theta_from_hf(hf)
    kh = hf.get("linear_num_key_heads") or heads
    kdim = hf.get("linear_key_head_dim") or int(0.75 * d / kh)
    return OlmoHybridConfig(
        num_layers=n, hidden_size=d, ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or d // heads,
        hybrid_layer_pattern=pattern_from_hf_layer_types(layer_types),
        linear_num_key_heads=kh, linear_num_value_heads=hf.get("linear_num_value_heads") or heads,
        linear_key_head_dim=kdim, linear_value_head_dim=hf.get("linear_value_head_dim") or 2 * kdim,
        linear_conv_kernel_dim=hf.get("linear_conv_kernel_dim", 4),
        linear_allow_neg_eigval=hf.get("linear_allow_neg_eigval", True),
        position_embedding_type="none" if theta is None else "rope",
        rotary_base=float(theta) if theta is not None else 500000.0,
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        vocab_size=hf["vocab_size"], make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=hf.get("max_position_embeddings", 65536),
        eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"))


DEFAULT_ROPE_THETA = 10000.0  # transformers' default when a config names no theta


def _rope_theta_from_hf(hf: dict) -> float | None:
    """RoPE base of an HF config, or None for NoPE (docs/model.md §3, §6 trap 4).

    NoPE only when the theta is explicitly null (``rope_parameters: null`` or
    ``{"rope_theta": null, ...}``, or a legacy top-level ``rope_theta: null``); a config that names
    no theta gets transformers' default RoPE (10000). Scaled RoPE variants are refused.

    Raises: ConfigError for a ``rope_type`` other than ``default``.
    """
    if "rope_parameters" in hf:
        rope = hf["rope_parameters"]
        if rope is None:
            return None
        legacy_theta = hf.get("rope_theta", DEFAULT_ROPE_THETA)
    else:
        rope = hf.get("rope_scaling") or {}
        legacy_theta = hf["rope_theta"] if "rope_theta" in hf else DEFAULT_ROPE_THETA
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ConfigError(f"config.json rope_type {rope_type!r} is not supported (Olmo Hybrid "
                          f"uses plain RoPE or NoPE); expected 'default'")
    if "rope_theta" in rope:
        return None if rope["rope_theta"] is None else float(rope["rope_theta"])
    return None if legacy_theta is None else float(legacy_theta)


def config_to_hf(cfg: OlmoHybridConfig) -> dict:
    """HF ``config.json`` dict as the released model writes it (docs/model.md §6)."""
    return {
        "architectures": ["OlmoHybridForCausalLM"], "model_type": "olmo_hybrid",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "rms_norm_eps": cfg.norm_epsilon, "tie_word_embeddings":
            not cfg.untie_embeddings_and_output_weights,
        "max_position_embeddings": cfg.max_position_embeddings,
        "layer_types": cfg.layout.hf_layer_types(),
        "linear_num_key_heads": cfg.linear_num_key_heads,
        "linear_num_value_heads": cfg.linear_num_value_heads,
        "linear_key_head_dim": cfg.linear_key_head_dim,
        "linear_value_head_dim": cfg.linear_value_head_dim,
        "linear_conv_kernel_dim": cfg.linear_conv_kernel_dim,
        "linear_allow_neg_eigval": cfg.linear_allow_neg_eigval,
        "rope_parameters": ({"rope_theta": None} if cfg.position_embedding_type == "none" else
                            {"rope_type": "default", "rope_theta": cfg.rotary_base}),
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        **({} if cfg.kv_channels * cfg.num_attention_heads == cfg.hidden_size
           else {"head_dim": cfg.kv_channels}),
    }


def canonical_hf(hf_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same tensors under canonical HF names (the aliases of docs/model.md §6 trap 3 renamed)."""
    out = {}
    for k, v in hf_sd.items():
        out[canonical_hf_name(k)] = v
    return out


def canonical_hf_name(name: str) -> str:
    """An HF tensor name with the layer-level aliases of docs/model.md §6 trap 3 renamed."""
    m = re.match(r"(model\.layers\.\d+\.)(.*)", name)
    if m and m.group(2) in LAYER_ALIASES:
        return m.group(1) + LAYER_ALIASES[m.group(2)]
    return name


def _take(sd: dict[str, Tensor], key: str, shape: tuple | None = None) -> Tensor:
    if key not in sd:
        raise KeyError(f"HF checkpoint is missing tensor {key!r}")
    t = sd.pop(key)
    if shape is not None:
        _check_shape(key, t, shape)
    return t


def _simple_shapes(cfg: OlmoHybridConfig) -> dict[str, tuple]:
    """Expected HF shapes of the per-layer tensors that map one to one (both layer kinds; the
    names they share have the same shape in both)."""
    d, hv, dv = cfg.hidden_size, cfg.linear_num_value_heads, cfg.linear_value_head_dim
    return {"input_layernorm.weight": (d,), "linear_attn.A_log": (hv,),
            "linear_attn.dt_bias": (hv,), "linear_attn.o_norm.weight": (dv,),
            "linear_attn.o_proj.weight": (d, hv * dv), "post_attention_layernorm.weight": (d,),
            "mlp.down_proj.weight": (d, cfg.ffn_hidden_size), **_attn_shapes(cfg)}


def _attn_shapes(cfg: OlmoHybridConfig) -> dict[str, tuple]:
    """Expected HF shapes of the one-to-one tensors of attention layers."""
    d, q = cfg.hidden_size, cfg.num_attention_heads * cfg.kv_channels
    return {"self_attn.q_norm.weight": (q,), "self_attn.k_norm.weight":
            (cfg.num_query_groups * cfg.kv_channels,), "self_attn.o_proj.weight": (d, q),
            "post_attention_layernorm.weight": (d,), "post_feedforward_layernorm.weight": (d,),
            "mlp.down_proj.weight": (d, cfg.ffn_hidden_size)}


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def hf_to_megatron(hf_sd: dict[str, Tensor], cfg: OlmoHybridConfig) -> dict[str, Tensor]:
    """HF tensors -> Megatron global state dict (TP=1 tensors, global layer indices).

    Accepts the released layout, fused ``linear_attn.conv1d.weight`` and the aliases of docs/model.md §6.
    Tensors are not cast. Vocabulary rows are zero-padded to ``cfg.padded_vocab_size``.

    Raises: KeyError for a missing tensor, ValueError for a wrong shape or unused tensors.
    """
    sd = canonical_hf(hf_sd)
    out: dict[str, Tensor] = {}
    for i in range(cfg.num_layers):
        out.update(layer_hf_to_megatron(sd, i, cfg))
    out.update(globals_hf_to_megatron(sd, cfg))
    if sd:
        raise ValueError(f"HF checkpoint has tensors the config does not use: {sorted(sd)[:8]}")
    return out


def layer_hf_to_megatron(sd: dict[str, Tensor], i: int, cfg: OlmoHybridConfig) -> dict[str, Tensor]:
    """Layer ``i``'s HF tensors (canonical names, popped from ``sd``) -> its Megatron global tensors.

    Raises: KeyError for a missing tensor, ValueError for a wrong shape.
    """
    kind = cfg.layout.layer_types[i]
    d = cfg.hidden_size
    hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
    out: dict[str, Tensor] = {}
    simple = GDN_SIMPLE if kind == GDN else ATTN_SIMPLE
    shapes = _simple_shapes(cfg)
    for h, m in simple.items():
        out[mp + m] = _take(sd, hp + h, shapes[h])
    gate = _take(sd, hp + "mlp.gate_proj.weight", (cfg.ffn_hidden_size, d))
    up = _take(sd, hp + "mlp.up_proj.weight", (cfg.ffn_hidden_size, d))
    out[mp + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
    del gate, up
    if kind == GDN:
        lay = GdnProjectionLayout.from_config(cfg)
        out[mp + "self_attention.in_proj.weight"] = torch.cat(
            [_take(sd, f"{hp}linear_attn.{n}.weight", (rows, d))
             for n, rows in zip(HF_IN_PROJ_NAMES, lay.in_proj_sizes(), strict=True)])
        conv_shape = (lay.conv_dim, 1, cfg.linear_conv_kernel_dim)
        if hp + "linear_attn.conv1d.weight" in sd:
            conv = _take(sd, hp + "linear_attn.conv1d.weight", conv_shape)
        else:
            # transformers' default save splits the fused conv into three *equal* chunks
            # (docs/model.md §6 trap 2): concatenate whatever sizes were stored, then check the total
            conv = torch.cat([_take(sd, f"{hp}linear_attn.{n}.weight") for n in HF_CONV_NAMES])
            if tuple(conv.shape) != conv_shape:
                raise ValueError(f"HF tensors {hp}linear_attn.{{q,k,v}}_conv1d.weight "
                                 f"concatenate to {tuple(conv.shape)}; the config expects "
                                 f"{conv_shape}")
        out[mp + "self_attention.conv1d.weight"] = conv
    else:
        dh, g = cfg.kv_channels, cfg.num_query_groups
        q = _take(sd, hp + "self_attn.q_proj.weight", (cfg.num_attention_heads * dh, d))
        k = _take(sd, hp + "self_attn.k_proj.weight", (g * dh, d))
        v = _take(sd, hp + "self_attn.v_proj.weight", (g * dh, d))
        q = q.view(g, -1, d)
        out[mp + "self_attention.linear_qkv.weight"] = torch.cat(
            [q, k.view(g, dh, d), v.view(g, dh, d)], dim=1).reshape(-1, d)
    return out


def globals_hf_to_megatron(sd: dict[str, Tensor], cfg: OlmoHybridConfig) -> dict[str, Tensor]:
    """Embedding, final norm and LM head (popped from ``sd``) -> Megatron global tensors.

    Vocabulary rows are zero-padded to ``cfg.padded_vocab_size``; with tied embeddings an
    ``lm_head.weight`` present in the files must equal the embedding.
    Raises: KeyError for a missing tensor, ValueError for a wrong shape or an untied head.
    """
    out: dict[str, Tensor] = {}
    names = list(GLOBAL_NAMES)
    if not cfg.untie_embeddings_and_output_weights and "lm_head.weight" not in sd:
        names.remove("lm_head.weight")
    for name in names:
        if name not in sd:
            raise KeyError(f"HF checkpoint is missing tensor {name!r}")
        emb = out.get("embedding.word_embeddings.weight")
        mapped = global_hf_to_megatron(name, sd.pop(name), cfg, embedding=emb)
        if mapped is not None:
            out[mapped[0]] = mapped[1]
    return out


#: the HF tensors outside the decoder layers, in the order converters read them
GLOBAL_NAMES = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def global_hf_to_megatron(name: str, t: Tensor, cfg: OlmoHybridConfig,
                          embedding: Tensor | None = None):
    """One HF tensor outside the layers -> (Megatron global key, tensor), or None for a tied head.

    Args:
        name: one of ``GLOBAL_NAMES``.
        embedding: the converted (padded) embedding, to check a tied ``lm_head.weight`` against.
    Raises: ValueError for a wrong shape, an unknown name, or a tied head that differs.
    """
    d, v = cfg.hidden_size, cfg.vocab_size
    if name == "model.embed_tokens.weight":
        _check_shape(name, t, (v, d))
        return "embedding.word_embeddings.weight", _pad_rows(t, cfg.padded_vocab_size)
    if name == "model.norm.weight":
        _check_shape(name, t, (d,))
        return "decoder.final_layernorm.weight", t
    if name == "lm_head.weight":
        if cfg.untie_embeddings_and_output_weights:
            _check_shape(name, t, (v, d))
            return "output_layer.weight", _pad_rows(t, cfg.padded_vocab_size)
        if embedding is not None and not torch.equal(t[:v].to(embedding.dtype), embedding[:v]):
            raise ValueError("config.json has tie_word_embeddings=true but lm_head.weight "
                             "differs from model.embed_tokens.weight")
        return None
    raise ValueError(f"HF tensor {name!r} is not a layer tensor nor one of {GLOBAL_NAMES}")


def _check_shape(key: str, t: Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"HF tensor {key!r} has shape {tuple(t.shape)}; the config expects "
                         f"{tuple(shape)}")


def megatron_to_hf(mg: dict[str, Tensor], cfg: OlmoHybridConfig) -> dict[str, Tensor]:
    """Megatron global state dict -> HF tensors with the released names (separate q/k/v convs).

    Padding rows beyond ``cfg.vocab_size`` are dropped. Raises KeyError for a missing tensor.
    """
    mg = dict(mg)
    out: dict[str, Tensor] = {}
    for i in range(cfg.num_layers):
        out.update(layer_megatron_to_hf(mg, i, cfg))
    out.update(globals_megatron_to_hf(mg, cfg))
    return out


def layer_megatron_to_hf(mg: dict[str, Tensor], i: int, cfg: OlmoHybridConfig) -> dict[str, Tensor]:
    """Layer ``i``'s Megatron global tensors (popped from ``mg``) -> HF tensors, released names.

    Raises KeyError for a missing tensor.
    """
    kind = cfg.layout.layer_types[i]
    d = cfg.hidden_size
    hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
    out: dict[str, Tensor] = {}
    simple = GDN_SIMPLE if kind == GDN else ATTN_SIMPLE
    for h, m in simple.items():
        out[hp + h] = _pop(mg, mp + m)
    gate, up = _pop(mg, mp + "mlp.linear_fc1.weight").chunk(2)
    out[hp + "mlp.gate_proj.weight"], out[hp + "mlp.up_proj.weight"] = gate, up
    if kind == GDN:
        lay = GdnProjectionLayout.from_config(cfg)
        parts = torch.split(_pop(mg, mp + "self_attention.in_proj.weight"), list(lay.in_proj_sizes()))
        out.update({f"{hp}linear_attn.{n}.weight": p for n, p in zip(HF_IN_PROJ_NAMES, parts, strict=True)})
        convs = torch.split(_pop(mg, mp + "self_attention.conv1d.weight"), list(lay.conv_sizes()))
        out.update({f"{hp}linear_attn.{n}.weight": c for n, c in zip(HF_CONV_NAMES, convs, strict=True)})
    else:
        dh, g = cfg.kv_channels, cfg.num_query_groups
        qkv = _pop(mg, mp + "self_attention.linear_qkv.weight").view(g, -1, dh, d)
        per = cfg.num_attention_heads // g
        out[hp + "self_attn.q_proj.weight"] = qkv[:, :per].reshape(-1, d)
        out[hp + "self_attn.k_proj.weight"] = qkv[:, per].reshape(-1, d)
        out[hp + "self_attn.v_proj.weight"] = qkv[:, per + 1].reshape(-1, d)
    return {k: v.contiguous() for k, v in out.items()}


def globals_megatron_to_hf(mg: dict[str, Tensor], cfg: OlmoHybridConfig) -> dict[str, Tensor]:
    """Embedding, final norm and (untied) LM head (popped from ``mg``) -> HF tensors.

    Padding rows beyond ``cfg.vocab_size`` are dropped. Raises KeyError for a missing tensor.
    """
    out = {"model.embed_tokens.weight":
           _pop(mg, "embedding.word_embeddings.weight")[:cfg.vocab_size],
           "model.norm.weight": _pop(mg, "decoder.final_layernorm.weight")}
    if cfg.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = _pop(mg, "output_layer.weight")[:cfg.vocab_size]
    return {k: v.contiguous() for k, v in out.items()}


def _pop(mg: dict[str, Tensor], key: str) -> Tensor:
    if key not in mg:
        raise KeyError(f"Megatron checkpoint is missing tensor {key!r}")
    return mg.pop(key)


# ---------------------------------------------------------------------------------------------
# TP slicing: global (TP=1) tensor <-> one rank's tensor
# ---------------------------------------------------------------------------------------------
def _segments(name: str, cfg: OlmoHybridConfig) -> list[int] | None:
    """Row segments that are split separately per TP rank (fused tensors), or None (the GDN
    in_proj and conv1d segments are those of ``GdnProjectionLayout``)."""
    if name.endswith("self_attention.in_proj.weight"):
        return list(GdnProjectionLayout.from_config(cfg).in_proj_sizes())
    if name.endswith("self_attention.conv1d.weight"):
        return list(GdnProjectionLayout.from_config(cfg).conv_sizes())
    if name.endswith("mlp.linear_fc1.weight"):
        return [cfg.ffn_hidden_size, cfg.ffn_hidden_size]
    return None


_DIM1 = ("self_attention.out_proj.weight", "self_attention.linear_proj.weight",
         "mlp.linear_fc2.weight")
_DIM0 = ("self_attention.A_log", "self_attention.dt_bias", "self_attention.linear_qkv.weight",
         "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
         "embedding.word_embeddings.weight", "output_layer.weight")


def tp_split_dim(name: str) -> int | None:
    """The TP-sharded dim of a (non-fused) Megatron tensor, None when replicated."""
    if name.endswith(_DIM1):
        return 1
    if name.endswith(_DIM0):
        return 0
    return None


def is_tp_sharded(name: str, cfg: OlmoHybridConfig) -> bool:
    """True when a Megatron tensor is split over TP ranks (plain or fused), False when replicated."""
    return _segments(name, cfg) is not None or tp_split_dim(name) is not None


def tp_shard(name: str, t: Tensor, cfg: OlmoHybridConfig, rank: int, tp: int) -> Tensor:
    """Rank ``rank``'s slice of a global Megatron tensor (fused tensors interleaved per rank)."""
    seg = _segments(name, cfg)
    if seg is not None:
        return interleaved_shard(t, seg, rank, tp)
    dim = tp_split_dim(name)
    return t if dim is None else t.chunk(tp, dim=dim)[rank]


def tp_merge(name: str, shards: list[Tensor], cfg: OlmoHybridConfig) -> Tensor:
    """Inverse of ``tp_shard``: the global tensor from every rank's slice (rank order)."""
    seg = _segments(name, cfg)
    if seg is not None:
        return interleaved_merge(shards, seg)
    dim = tp_split_dim(name)
    return shards[0] if dim is None else torch.cat(shards, dim=dim)


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")


def local_state_dict(global_sd: dict[str, Tensor], cfg: OlmoHybridConfig, tp_rank: int, tp: int,
                     stage_layers: Iterable[int], keys: Iterable[str]) -> dict[str, Tensor]:
    """One rank's ``model.state_dict()`` from the global dict.

    Args:
        stage_layers: global indices of this stage's layers (``OlmoHybridModel.stage_layers``).
        keys: the model's own state-dict keys (selects embedding / output / final norm and skips
            ``_extra_state`` entries, which are left to the model).

    Raises: KeyError when the global dict lacks a tensor the model has.
    """
    layers = list(stage_layers)
    out = {}
    for key in keys:
        if key.endswith("_extra_state"):
            continue
        m = _LAYER.match(key)
        gkey = f"decoder.layers.{layers[int(m.group(1))]}.{m.group(2)}" if m else key
        if gkey == "output_layer.weight" and not cfg.untie_embeddings_and_output_weights:
            gkey = "embedding.word_embeddings.weight"  # tied: the last stage's copy of it
        if gkey not in global_sd:
            raise KeyError(f"no tensor for model key {key!r} (global {gkey!r})")
        out[key] = tp_shard(gkey, global_sd[gkey], cfg, tp_rank, tp)
    return out


def load_global_into_model(model, global_sd: dict[str, Tensor], cfg: OlmoHybridConfig) -> None:
    """Copy a global Megatron state dict into this rank's model (any TP / PP), strictly.

    Raises: KeyError / RuntimeError on missing or mismatched tensors.
    """
    from megatron.core import parallel_state as ps

    own = model.state_dict()
    local = local_state_dict(global_sd, cfg, ps.get_tensor_model_parallel_rank(),
                             ps.get_tensor_model_parallel_world_size(), model.stage_layers, own)
    for k, v in local.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"tensor {k!r}: checkpoint slice {tuple(v.shape)} vs model "
                             f"{tuple(own[k].shape)}")
    missing, unexpected = model.load_state_dict(local, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
