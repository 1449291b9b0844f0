"""Tiny HF ``OlmoHybridForCausalLM`` models (spec ``olmo_hybrid.md`` §12) used as references.

transformers' pure-torch path is used: fla is hidden before transformers' olmo_hybrid module is
imported (it would bind fla kernels, which crash on CPU).
"""
from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "fla" not in sys.modules and not torch.cuda.is_available():
    sys.modules["fla"] = None  # transformers must not bind fla kernels on CPU

BASE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=4,
    num_key_value_heads=4, linear_num_key_heads=4, linear_num_value_heads=4,
    linear_key_head_dim=16, linear_value_head_dim=32, linear_conv_kernel_dim=4,
    linear_allow_neg_eigval=True, max_position_embeddings=512, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=0, bos_token_id=None, eos_token_id=1, tie_word_embeddings=False)

#: the variations of spec §12 (name -> config overrides); "nope" is applied after construction
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
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms, A_log, dt_bias: distinct values per tensor
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    return model, cfg


def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [B, T, V] of the HF model."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()
