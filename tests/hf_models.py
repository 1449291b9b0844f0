"""Tiny HF ``OlmoHybridForCausalLM`` models (spec ``docs/model.md`` §12) used as references.

transformers' pure-torch path is used: fla is hidden before transformers' olmo_hybrid module is
imported (it would bind fla kernels, which crash on CPU).
"""
from __future__ import annotations

import os

import torch

from megatron_hybrid.hf.validate import hide_fla_on_cpu

os.environ.setdefault("HF_HUB_OFFLINE", "1")
hide_fla_on_cpu()  # transformers must not bind fla kernels on CPU

BASE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=4,
    num_key_value_heads=4, linear_num_key_heads=4, linear_num_value_heads=4,
    linear_key_head_dim=16, linear_value_head_dim=32, linear_conv_kernel_dim=4,
    linear_allow_neg_eigval=True, max_position_embeddings=512, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=0, bos_token_id=None, eos_token_id=1, tie_word_embeddings=False)

#: the variations of docs/model.md §12 (name -> config overrides); "nope" is applied after construction
VARIATIONS = {
    "base": {},
    "grouped_values": dict(linear_num_key_heads=2, linear_num_value_heads=4),
    "tied": dict(tie_word_embeddings=True),
    "nope": dict(_nope=True),
    "eps_1e-5": dict(rms_norm_eps=1e-5),
    "pattern_1to1": dict(layer_types=["linear_attention", "full_attention"] * 2),
    "attention_first": dict(layer_types=["full_attention"] + ["linear_attention"] * 3),
    "gqa": dict(num_key_value_heads=2),
    "default_head_dims": dict(linear_key_head_dim=None, linear_value_head_dim=None),
}


def make_hf_model(variation: str = "base", seed: int = 0, **extra):
    """(model in fp32 eval mode, its config) for a named variation, weights randomised.

    Norm weights, A_log and dt_bias are perturbed away from their init so a swapped tensor shows.
    """
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    kw = {**BASE, **VARIATIONS[variation], **extra}
    nope = kw.pop("_nope", False)
    cfg = OlmoHybridConfig(**{k: v for k, v in kw.items() if v is not None or k in (
        "bos_token_id",)})
    if nope:
        cfg.rope_parameters = None
    torch.manual_seed(seed)
    model = OlmoHybridForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms, A_log, dt_bias: distinct values per tensor
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    return model, cfg


def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [B, T, V] of the HF model."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def release_state_dict(hf_sd, cfg):
    """HF in-memory tensors -> the released file layout (separate q/k/v convs, docs/model.md §6).

    ``cfg`` is the project's OlmoHybridConfig of the model. Tied models keep no ``lm_head``.
    """
    out = {}
    kd = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    vd = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    for k, v in hf_sd.items():
        if k.endswith("linear_attn.conv1d.weight"):
            base = k[: -len("conv1d.weight")]
            for n, t in zip(("q", "k", "v"), torch.split(v, [kd, kd, vd]), strict=True):
                out[f"{base}{n}_conv1d.weight"] = t.clone()
        else:
            out[k] = v.clone()
    if cfg.untie_embeddings_and_output_weights is False:
        out.pop("lm_head.weight", None)
    return out


def save_release_dir(model, directory, dtype=None, max_shard_bytes=None):
    """Write ``model`` as the released checkpoint would be: config.json (transformers') and
    safetensors with the released names, optionally cast and sharded with an index."""
    from megatron_hybrid.hf.mapping import config_from_hf
    from megatron_hybrid.hf.safetensors_writer import ShardedSafetensorsWriter

    os.makedirs(directory, exist_ok=True)
    cfg = config_from_hf(model.config.to_dict())
    sd = release_state_dict(model.state_dict(), cfg)
    writer = ShardedSafetensorsWriter(str(directory), max_shard_bytes or 10 ** 12)
    for k, v in sd.items():
        writer.add(k, v.to(dtype) if dtype is not None else v)
    writer.finish()
    config = model.config  # as model.save_pretrained writes it: architectures and dtype set
    config.architectures = [type(model).__name__]
    config.dtype = str(dtype or next(model.parameters()).dtype).replace("torch.", "")
    config.save_pretrained(str(directory))
    return sd
