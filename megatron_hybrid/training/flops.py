"""Training FLOPs per token and MFU for Olmo Hybrid (spec ``docs/model.md`` §10, ``docs/design.md`` §9).

Letters: S sequence length, D hidden size, F FFN size, V padded vocabulary, Ha attention heads,
Hkv query groups, Dh attention head dim, H / HV GDN key / value heads, Dk / Dv GDN head dims,
C GDN chunk size (64).

    F_token = 6 N_mm + L_attn * 6 Ha Dh S + L_gdn * 3 HV f,
    f = 6 C Dk + 4 C Dv + 6 Dk Dv + (2/3) C^2

N_mm counts every matmul weight including the LM head (not the embedding lookup, norms, A_log,
dt_bias; the short convs are negligible). The attention term is causal (half of 12 Ha Dh S).
For the 7B at S = 8192 this gives 44.2 GFLOP/token. GDN layers are never counted as attention.
"""
from __future__ import annotations

from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.config.gdn_projection import GdnProjectionLayout
from megatron_hybrid.config.layout import GDN

#: Dense bf16 peak of H100 / H200 SXM (TFLOP/s), docs/model.md §10.
HOPPER_BF16_PEAK_TFLOPS = 989.4
GDN_CHUNK_SIZE = 64


def matmul_params(cfg: OlmoHybridConfig) -> dict:
    """Matmul weights by kind: {'attention', 'gdn', 'mlp', 'lm_head'} (counts, not bytes).

    Uses the unpadded-vocabulary-independent padded LM head (``padded_vocab_size`` rows), as
    the model computes them. Source: docs/model.md §10 (N_mm).
    """
    D, Dh = cfg.hidden_size, cfg.kv_channels
    types = cfg.layout.layer_types
    n_gdn = sum(1 for t in types if t == GDN)
    n_attn = len(types) - n_gdn
    attn = D * (cfg.num_attention_heads * Dh + 2 * cfg.num_query_groups * Dh) \
        + cfg.num_attention_heads * Dh * D
    lay = GdnProjectionLayout.from_config(cfg)
    gdn = D * lay.in_proj_dim + lay.value_dim * D    # in_proj + out_proj
    mlp = 3 * D * cfg.ffn_hidden_size
    return {"attention": n_attn * attn, "gdn": n_gdn * gdn, "mlp": cfg.num_layers * mlp,
            "lm_head": D * cfg.padded_vocab_size}


def gdn_core_flops_per_head(key_dim: int, value_dim: int, chunk: int = GDN_CHUNK_SIZE) -> float:
    """f of docs/model.md §10: chunked gated-delta-rule forward FLOPs per token and value head."""
    C, Dk, Dv = chunk, key_dim, value_dim
    return 6 * C * Dk + 4 * C * Dv + 6 * Dk * Dv + (2.0 / 3.0) * C * C


def training_flops_per_token(cfg: OlmoHybridConfig, seq_length: int) -> float:
    """Forward + backward FLOPs per token at sequence length ``seq_length`` (docs/model.md §10).

    Raises: ValueError for a non-positive sequence length.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    n_mm = sum(matmul_params(cfg).values())
    types = cfg.layout.layer_types
    n_gdn = sum(1 for t in types if t == GDN)
    n_attn = len(types) - n_gdn
    attn = n_attn * 6 * cfg.num_attention_heads * cfg.kv_channels * seq_length
    gdn = n_gdn * 3 * cfg.linear_num_value_heads * gdn_core_flops_per_head(
        cfg.linear_key_head_dim, cfg.linear_value_head_dim)
    return 6.0 * n_mm + attn + gdn


def detect_peak_tflops() -> float | None:
    """The dense bf16 peak of the current CUDA device when known (H100/H200), else None."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name or "H800" in name or "GH200" in name:
        return HOPPER_BF16_PEAK_TFLOPS
    return None


def mfu(tokens_per_s_per_gpu: float, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s per GPU over the peak."""
    return tokens_per_s_per_gpu * flops_per_token / (peak_tflops * 1e12)
