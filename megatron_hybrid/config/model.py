"""Model configuration of megatron-hybrid: shape, presets, parallel validation.

``OlmoHybridConfig`` is the user-facing, parallelism-free description of one Olmo Hybrid model
(field names follow Megatron-LM's flags, ``docs/design.md`` §6). It is written to each checkpoint's
``run_config.yaml`` and turned into a megatron-core ``TransformerConfig`` for a given layout by
``to_transformer_config``. The padded vocabulary is fixed once, independent of TP (docs/model.md §7).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from megatron_hybrid.config.layout import HybridLayout, parse_layout, pattern_from_attention_freq
from megatron_hybrid.init import trunc_normal_init


class ConfigError(ValueError):
    """An invalid model or parallel configuration; the message names the flag and the reason."""


def pad_vocab_size(vocab_size: int, divisible_by: int = 128) -> int:
    """Smallest multiple of ``divisible_by`` >= ``vocab_size`` (dolma2: 100,278 -> 100,352)."""
    return int(math.ceil(vocab_size / divisible_by) * divisible_by)


@dataclass
class OlmoHybridConfig:
    """Shape of an Olmo Hybrid model (spec ``docs/model.md`` §1-§4, presets ``docs/design.md`` §6a).

    ``vocab_size`` is the tokenizer's (HF config) vocabulary; ``padded_vocab_size`` the number of
    embedding rows, a multiple of ``make_vocab_size_divisible_by`` (computed when left None).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    hybrid_layer_pattern: str | None = None
    num_query_groups: int | None = None
    kv_channels: int | None = None
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_conv_kernel_dim: int = 4
    linear_allow_neg_eigval: bool = True
    position_embedding_type: str = "rope"
    rotary_base: float = 500000.0
    norm_epsilon: float = 1e-6
    gdn_norm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = True
    make_vocab_size_divisible_by: int = 128
    padded_vocab_size: int | None = None
    max_position_embeddings: int = 65536
    init_method_std: float = 0.02
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "vocab_size", "linear_conv_kernel_dim", "make_vocab_size_divisible_by"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_query_groups", "kv_channels", "linear_num_key_heads",
                     "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.norm_epsilon <= 0 or self.gdn_norm_epsilon <= 0:
            raise ConfigError("norm epsilons must be > 0")
        if self.hybrid_layer_pattern is None:
            self.hybrid_layer_pattern = pattern_from_attention_freq(self.num_layers, 4)
        _ = self.layout  # validates the pattern against num_layers
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.linear_num_key_heads is None:
            self.linear_num_key_heads = self.num_attention_heads
        if self.linear_num_value_heads is None:
            self.linear_num_value_heads = self.linear_num_key_heads
        if self.linear_key_head_dim is None:
            self.linear_key_head_dim = int(0.75 * self.hidden_size / self.linear_num_key_heads)
        if self.linear_value_head_dim is None:
            self.linear_value_head_dim = 2 * self.linear_key_head_dim
        if self.position_embedding_type not in ("rope", "none"):
            raise ConfigError(f"--position-embedding-type {self.position_embedding_type!r}: "
                              f"expected 'rope' or 'none'")
        if self.padded_vocab_size is None:
            self.padded_vocab_size = pad_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by)
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size "
                              f"{self.vocab_size}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(f"--linear-num-value-heads {self.linear_num_value_heads} must be a "
                              f"multiple of --linear-num-key-heads {self.linear_num_key_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"--num-attention-heads {self.num_attention_heads} must be a "
                              f"multiple of --num-query-groups {self.num_query_groups}")

    @property
    def layout(self) -> HybridLayout:
        """The parsed, validated ``hybrid_layer_pattern`` (raises LayoutError)."""
        return parse_layout(self.hybrid_layer_pattern, self.num_layers)

    # -- parallel layout ------------------------------------------------------------------
    def tp_divisibility(self) -> dict[str, int]:
        """The sizes that TP must divide (docs/model.md §7), by flag name."""
        return {
            "--num-attention-heads": self.num_attention_heads,
            "--num-query-groups": self.num_query_groups,
            "--linear-num-key-heads": self.linear_num_key_heads,
            "--linear-num-value-heads": self.linear_num_value_heads,
            "--ffn-hidden-size": self.ffn_hidden_size,
            "padded vocabulary": self.padded_vocab_size,
        }

    def allowed_tensor_parallel_sizes(self, limit: int = 64) -> list[int]:
        """Every TP in [1, limit] that divides all sizes of ``tp_divisibility``."""
        sizes = self.tp_divisibility().values()
        return [t for t in range(1, limit + 1) if all(s % t == 0 for s in sizes)]

    def validate_parallel(self, tensor_model_parallel_size: int = 1,
                          pipeline_model_parallel_size: int = 1,
                          context_parallel_size: int = 1) -> None:
        """Reject a layout this model cannot run at, with the reason.

        Raises:
            ConfigError: TP does not divide heads / groups / GDN heads / FFN / padded vocab (the
                message lists the allowed values), CP x TP does not divide the head counts
                (head-parallel context parallelism, docs/model.md §7), PP exceeds the layers, or the
                pattern's ``|`` stages disagree with PP.
        """
        tp, pp, cp = (tensor_model_parallel_size, pipeline_model_parallel_size,
                      context_parallel_size)
        if cp < 1:
            raise ConfigError(f"--context-parallel-size must be >= 1, got {cp}")
        heads = {"--num-attention-heads": self.num_attention_heads,
                 "--num-query-groups": self.num_query_groups,
                 "--linear-num-key-heads": self.linear_num_key_heads,
                 "--linear-num-value-heads": self.linear_num_value_heads}
        bad_cp = [f"{name} = {n}" for name, n in heads.items() if n % (cp * tp)]
        if cp > 1 and bad_cp and all(n % tp == 0 for n in heads.values()):
            raise ConfigError(
                f"--context-parallel-size {cp} x --tensor-model-parallel-size {tp} = {cp * tp} "
                f"does not divide {', '.join(bad_cp)} (context parallelism splits the heads "
                f"across CP ranks; at TP {tp} the heads allow CP "
                f"{[c for c in range(1, 65) if all(n % (c * tp) == 0 for n in heads.values())]})")
        if tp < 1:
            raise ConfigError(f"--tensor-model-parallel-size must be >= 1, got {tp}")
        bad = [f"{name} = {n}" for name, n in self.tp_divisibility().items() if n % tp]
        if bad:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} does not divide {', '.join(bad)}; allowed "
                f"values for this model: {self.allowed_tensor_parallel_sizes()}")
        if pp < 1 or pp > self.num_layers:
            raise ConfigError(f"--pipeline-model-parallel-size {pp} must be in [1, "
                              f"{self.num_layers}] (--num-layers)")
        stages = self.layout.stage_sizes
        if stages is not None and len(stages) != pp:
            raise ConfigError(f"--hybrid-layer-pattern has {len(stages)} pipeline stages ('|') but "
                              f"--pipeline-model-parallel-size is {pp}")
        self.stage_sizes(pp)  # PP must split the layers evenly unless '|' marks the stages

    def stage_sizes(self, pp: int) -> list[int]:
        """Layers per pipeline stage: the pattern's ``|`` stages, else megatron-core's even split.

        Raises: ConfigError when PP does not divide the layers and the pattern has no ``|``.
        """
        stages = self.layout.stage_sizes
        if stages is not None:
            return list(stages)
        if self.num_layers % pp:
            raise ConfigError(f"--num-layers {self.num_layers} is not divisible by "
                              f"--pipeline-model-parallel-size {pp}; mark uneven stages with '|' in "
                              f"--hybrid-layer-pattern")
        return [self.num_layers // pp] * pp

    # -- megatron-core -----------------------------------------------------------------------
    def to_transformer_config(self, tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              sequence_parallel: bool = False,
                              params_dtype: torch.dtype = torch.float32,
                              **overrides: Any):
        """megatron-core TransformerConfig for one layout (``OlmoHybridTransformerConfig``).

        ``overrides`` are passed through (e.g. ``bf16=True``, ``recompute_granularity``,
        ``context_parallel_size``, ``kernel_backend``). Raises ConfigError (see validate_parallel).
        """
        from megatron_hybrid.config.transformer import OlmoHybridTransformerConfig

        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        self.validate_parallel(tp, pp, overrides.get("context_parallel_size", 1))
        init = trunc_normal_init(self.init_method_std)
        kwargs = dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups, kv_channels=self.kv_channels,
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            sequence_parallel=sequence_parallel and tp > 1,
            normalization="RMSNorm", layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True, activation_func=torch.nn.functional.silu,
            add_bias_linear=False, add_qkv_bias=False, bias_activation_fusion=False,
            hidden_dropout=0.0, attention_dropout=0.0, init_method=init,
            output_layer_init_method=init, init_method_std=self.init_method_std,
            embedding_init_method=init, use_cpu_initialization=True,
            params_dtype=params_dtype, pipeline_dtype=params_dtype,
            rotary_interleaved=False, apply_rope_fusion=False, masked_softmax_fusion=False,
            bias_dropout_fusion=False, persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            hybrid_layer_types=tuple(self.layout.layer_types),
            linear_conv_kernel_dim=self.linear_conv_kernel_dim,
            linear_key_head_dim=self.linear_key_head_dim,
            linear_value_head_dim=self.linear_value_head_dim,
            linear_num_key_heads=self.linear_num_key_heads,
            linear_num_value_heads=self.linear_num_value_heads,
            linear_allow_neg_eigval=self.linear_allow_neg_eigval,
            gdn_norm_epsilon=self.gdn_norm_epsilon,
        )
        sizes = self.stage_sizes(pp)
        if pp > 1 and len(set(sizes)) > 1:
            layout = [["decoder"] * n for n in sizes]
            layout[0].insert(0, "embedding")
            layout[-1].append("loss")
            kwargs["pipeline_model_parallel_layout"] = layout
        kwargs.update(overrides)
        valid = {f.name for f in dataclasses.fields(OlmoHybridTransformerConfig)}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise ConfigError(f"unknown TransformerConfig fields: {unknown}")
        return OlmoHybridTransformerConfig(**kwargs)

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (what ``run_config.yaml`` stores under ``model``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OlmoHybridConfig:
        """Build from a dict (e.g. ``run_config.yaml``'s ``model``); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}; known: {sorted(names)}")
        return cls(**d)


PRESETS: dict[str, dict[str, Any]] = {
    "olmo_hybrid_7b": dict(
        num_layers=32, hidden_size=3840, ffn_hidden_size=11008, num_attention_heads=30,
        kv_channels=128, hybrid_layer_pattern="G-G-G-*-" * 8, linear_num_key_heads=30,
        linear_num_value_heads=30, linear_key_head_dim=96, linear_value_head_dim=192,
        vocab_size=100278, eos_token_id=100257, pad_token_id=100277),
    "olmo_hybrid_1b": dict(
        num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=16,
        kv_channels=128, hybrid_layer_pattern="G-G-G-*-" * 4, linear_num_key_heads=16,
        linear_num_value_heads=16, linear_key_head_dim=96, linear_value_head_dim=192,
        vocab_size=100278, eos_token_id=100257, pad_token_id=100277),
    "tiny": dict(
        num_layers=8, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
        kv_channels=64, hybrid_layer_pattern="G-G-G-*-" * 2, linear_num_key_heads=4,
        linear_num_value_heads=4, linear_key_head_dim=48, linear_value_head_dim=96,
        vocab_size=8192),
}


def preset_config(name: str, **overrides: Any) -> OlmoHybridConfig:
    """A preset of ``docs/design.md`` §6a with overrides (e.g. the tokenizer's ``vocab_size``).

    Raises: ConfigError for an unknown preset name.
    """
    if name not in PRESETS:
        raise ConfigError(f"--model-preset {name!r}: expected one of {sorted(PRESETS)}")
    return OlmoHybridConfig(**{**PRESETS[name], **overrides})
