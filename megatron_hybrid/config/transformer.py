"""megatron-core ``TransformerConfig`` extended with the Olmo Hybrid fields the layers read.

The GDN shape fields reuse megatron-core 0.16's names (``linear_num_key_heads``,
``linear_key_head_dim``, ...); ``experimental_attention_variant`` stays None because the project
builds its own stack (megatron-core's GDN specs are Transformer-Engine only).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class OlmoHybridTransformerConfig(TransformerConfig):
    """TransformerConfig plus the Olmo Hybrid fields (spec ``docs/model.md`` §2-§4).

    Attributes:
        hybrid_layer_types: mixer kind per global layer, ``"G"`` (GDN) or ``"*"`` (attention).
        linear_allow_neg_eigval: beta = 2*sigmoid(b) (in (0, 2)) instead of sigmoid(b).
        gdn_norm_epsilon: epsilon of the GDN gated output norm (1e-5 in the release).
        kernel_backend: None (auto: fla on CUDA, PyTorch otherwise), "torch" or "fla".
    """

    hybrid_layer_types: tuple[str, ...] = field(default_factory=tuple)
    linear_allow_neg_eigval: bool = True
    gdn_norm_epsilon: float = 1e-5
    kernel_backend: str = None
