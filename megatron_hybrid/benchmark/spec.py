"""What the benchmark runs: shapes, precision, optimizer settings, tokens, software versions.

Letters: B micro-batch size, S sequence length, V vocabulary rows (= padded vocabulary: the
benchmark uses 100352 so that HF and Megatron compute the same LM head).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from dataclasses import asdict, dataclass

import torch

from megatron_hybrid.config import OlmoHybridConfig, preset_config
from megatron_hybrid.config.layout import GDN, pattern_from_attention_freq

#: Vocabulary of the benchmark (dolma2 padded to 128: what the 7B's embedding and LM head hold).
BENCH_VOCAB = 100352
#: Layers of the full model the reduced-depth measurement is extrapolated to (docs/model.md §1).
FULL_LAYERS = 32


@dataclass
class BenchSpec:
    """One benchmark configuration (``cli`` fills it from the flags).

    Attributes:
        num_layers: reduced depth, a multiple of 4 (keeps ``G-G-G-*-``); 8 by default.
        seq_length: S (8192). micro_batch_size: B (1).
        dtype: "bf16" (GPU) or "fp32" (``--smoke``).
        warmup / iters: untimed (first one compiles and autotunes) / timed iterations per engine.
        breakdown_iters: timed fwd+bwd repetitions per module kind in ``breakdown``.
        smoke: tiny shapes on CPU with the PyTorch kernels.
        lr, min_lr, weight_decay, adam_beta1, adam_beta2, adam_eps, clip_grad: AdamW settings,
            the same for every engine (docs/model.md §8; weight decay on all but the embedding).
        z_loss_weight: ours only (transformers has no z-loss): 1e-5 as in training.
        hf_precision: "autocast" (fp32 master weights, bf16 autocast: transformers' Trainer
            ``--bf16``) or "bf16" (bf16 weights and AdamW states); "fp32" in smoke mode.
        micro_batches_full: micro-batches per iteration the full-model estimate amortizes the
            optimizer step over (``docs/design.md`` §9: 8).
        seed: tokens and initialization.
    """

    num_layers: int = 8
    seq_length: int = 8192
    micro_batch_size: int = 1
    dtype: str = "bf16"
    warmup: int = 2
    iters: int = 5
    breakdown_iters: int = 10
    smoke: bool = False
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    z_loss_weight: float = 1e-5
    hf_precision: str = "autocast"
    micro_batches_full: int = 8
    seed: int = 1234

    def __post_init__(self):
        if self.num_layers < 4 or self.num_layers % 4:
            raise ValueError(f"--num-layers {self.num_layers}: must be a positive multiple of 4 "
                             f"to keep the 3:1 GDN:attention pattern (G-G-G-*-)")
        for name in ("seq_length", "micro_batch_size", "warmup", "iters", "breakdown_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"dtype must be bf16 or fp32, got {self.dtype!r}")
        if self.hf_precision not in ("autocast", "bf16", "fp32"):
            raise ValueError(f"--hf-precision {self.hf_precision!r}: autocast, bf16 or fp32")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    @property
    def tokens_per_iteration(self) -> int:
        return self.micro_batch_size * self.seq_length

    def to_dict(self) -> dict:
        return asdict(self)


def smoke_spec(**overrides) -> BenchSpec:
    """Tiny CPU configuration of ``--smoke``: 4 layers, S 64, fp32, 1 warm-up + 2 timed steps."""
    base = dict(num_layers=4, seq_length=64, micro_batch_size=1, dtype="fp32", warmup=1,
                iters=2, breakdown_iters=2, smoke=True, hf_precision="fp32")
    base.update(overrides)
    return BenchSpec(**base)


def model_config(spec: BenchSpec, num_layers: int | None = None) -> OlmoHybridConfig:
    """The benchmarked model at ``num_layers`` (default ``spec.num_layers``) layers.

    GPU: the 7B preset's widths (docs/model.md §1, RoPE as pretraining stages 1-2) with vocabulary 100352.
    Smoke: d 64, 4 heads of 16, GDN 4 heads Dk 16 / Dv 32, FFN 128, vocabulary 256 (docs/model.md §12's
    tiny shapes). The vocabulary is never padded, so HF's and Megatron's LM heads agree.
    """
    n = num_layers or spec.num_layers
    pattern = pattern_from_attention_freq(n, 4)
    if spec.smoke:
        cfg = OlmoHybridConfig(
            num_layers=n, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            kv_channels=16, vocab_size=256, hybrid_layer_pattern=pattern,
            linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=32, max_position_embeddings=max(512, spec.seq_length))
    else:
        cfg = preset_config("olmo_hybrid_7b", num_layers=n, hybrid_layer_pattern=pattern,
                            vocab_size=BENCH_VOCAB)
    assert cfg.padded_vocab_size == cfg.vocab_size, "benchmark vocabularies are never padded"
    return cfg


def layer_counts(cfg: OlmoHybridConfig) -> dict[str, int]:
    """{'gdn': n_G, 'attention': n_A} for a config's layout."""
    types = cfg.layout.layer_types
    n_gdn = sum(1 for t in types if t == GDN)
    return {"gdn": n_gdn, "attention": len(types) - n_gdn}


def make_batch(spec: BenchSpec, vocab_size: int, device) -> dict[str, torch.Tensor]:
    """Fixed random tokens, identical for every engine (seeded, independent of the global RNG).

    Returns: tokens [B, S] int64, labels [B, S] int64 (the next token), position_ids [B, S],
    loss_mask [B, S] float (all ones), on ``device``.
    """
    gen = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(0, vocab_size, (spec.micro_batch_size, spec.seq_length + 1), generator=gen)
    B, S = spec.micro_batch_size, spec.seq_length
    batch = {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
             "position_ids": torch.arange(S).unsqueeze(0).expand(B, S).contiguous(),
             "loss_mask": torch.ones(B, S)}
    return {k: v.to(device) for k, v in batch.items()}


def _version(dist: str, module: str | None = None) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    if module:
        try:
            return getattr(__import__(module), "__version__", None)
        except Exception:  # not importable (fla on CPU, triton absent)
            return None
    return None


def environment(device: torch.device) -> dict:
    """GPU (or CPU), software versions and the date, for the report header."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": gpu or f"CPU ({platform.processor() or platform.machine()})",
        "gpu": gpu,
        "capability": ("{}.{}".format(*torch.cuda.get_device_capability(device))
                       if device.type == "cuda" else None),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fla-core": _version("fla-core"),
        "flash-linear-attention": _version("flash-linear-attention"),
        "transformers": _version("transformers"),
        "megatron-core": _version("megatron-core"),
        "env": {k: os.environ[k] for k in (
            "MEGATRON_HYBRID_KERNELS", "MEGATRON_HYBRID_FLA_HOPPER_SELFCHECK", "FLA_CACHE_MODE",
            "FLA_CONFIG_DIR", "FLA_CACHE_RESULTS", "TRITON_PRINT_AUTOTUNING",
            "CUDA_DEVICE_MAX_CONNECTIONS", "TORCHDYNAMO_DISABLE") if k in os.environ},
    }
