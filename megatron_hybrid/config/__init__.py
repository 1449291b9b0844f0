"""Configuration of megatron-hybrid: one home for every setting (``docs/architecture.md``).

- ``model``: ``OlmoHybridConfig``, the parallelism-free model shape, and the presets;
- ``layout``: the hybrid layer-pattern grammar (``G``, ``*``, ``-``, ``|``);
- ``gdn_projection``: the fused GDN ``in_proj`` / ``conv1d`` layout (segments, TP split, CP slice,
  checkpoint names);
- ``transformer``: the megatron-core ``TransformerConfig`` built from a model config and a layout;
- ``training``: the typed training configuration (``TrainingConfig``, one dataclass per group);
- ``flags``: command-line flags generated from such dataclasses;
- ``arguments``: the trainer's command line (Megatron-LM's flag names) and its validation.

This package imports no other part of megatron-hybrid except ``megatron_hybrid.init``; importing
it does not import megatron-core (only ``transformer`` does).
"""
from megatron_hybrid.config.model import PRESETS, ConfigError, OlmoHybridConfig, pad_vocab_size, preset_config

__all__ = ["PRESETS", "ConfigError", "OlmoHybridConfig", "pad_vocab_size", "preset_config"]
