"""Layer specs of the Olmo Hybrid stack, built from the validated layout (``docs/design.md`` §4).

A backend provider supplies the parallel linears and norms: ``LocalBackend`` uses megatron-core's
local modules (ColumnParallelLinear / RowParallelLinear) and the project's RMSNorm, with torch SDPA
inside the attention; ``TEBackend`` is the seam for Transformer Engine and is only accepted when
Transformer Engine imports.
"""
from __future__ import annotations

from collections.abc import Sequence

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_hybrid.config.layout import ATTENTION, GDN
from megatron_hybrid.layers.aligned_linear import AlignedColumnParallelLinear
from megatron_hybrid.layers.gated_delta_net import GatedDeltaNetSubmodules, OlmoGatedDeltaNet
from megatron_hybrid.layers.norms import RMSNorm
from megatron_hybrid.layers.olmo_attention import OlmoAttentionSubmodules, OlmoSelfAttention
from megatron_hybrid.layers.olmo_layers import OlmoPostNormLayer, OlmoPostNormLayerSubmodules


class LocalBackend:
    """megatron-core local modules + torch kernels (works on CPU and on GPUs without TE)."""

    name = "local"

    def column_parallel_linear(self):
        """Column-parallel linear class (output dim split over TP)."""
        return ColumnParallelLinear

    def row_parallel_linear(self):
        """Row-parallel linear class (input dim split over TP, output reduced)."""
        return RowParallelLinear

    def gdn_in_proj_linear(self):
        """The GDN's fused in_proj: column-parallel with its GEMM width aligned on GPUs
        (``aligned_linear.py``: its ``GdnProjectionLayout.in_proj_dim`` outputs defeat cuBLAS's fast
        kernels)."""
        return AlignedColumnParallelLinear

    def norm(self):
        """RMSNorm class with a TP-replicated weight (``layers/norms.py``)."""
        return RMSNorm


class TEBackend(LocalBackend):
    """Transformer Engine seam: the linears come from TE when it is installed.

    Raises:
        ImportError: Transformer Engine is not importable (``pip install .[te]`` on a CUDA host).
    """

    name = "te"

    def __init__(self):
        try:
            from megatron.core.extensions.transformer_engine import (  # noqa: F401
                TEColumnParallelLinear,
                TERowParallelLinear,
            )
        except Exception as exc:  # TE raises various errors when CUDA / libs are missing
            raise ImportError("--transformer-impl transformer_engine needs Transformer Engine "
                              f"(pip install 'megatron-hybrid[te]'); import failed: {exc}") from exc
        self._col, self._row = TEColumnParallelLinear, TERowParallelLinear

    def column_parallel_linear(self):
        """TE's column-parallel linear."""
        return self._col

    def row_parallel_linear(self):
        """TE's row-parallel linear."""
        return self._row

    def gdn_in_proj_linear(self):
        """TE's column-parallel linear (TE picks its own GEMMs)."""
        return self._col


def get_backend(name: str = "local"):
    """Backend provider by name (``local`` or ``transformer_engine``/``te``).

    Raises: ValueError for an unknown name; ImportError when TE is asked for but missing.
    """
    if name == "local":
        return LocalBackend()
    if name in ("te", "transformer_engine"):
        return TEBackend()
    raise ValueError(f"--transformer-impl {name!r}: expected 'local' or 'transformer_engine'")


def _mlp_spec(backend) -> ModuleSpec:
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()))


def gdn_layer_spec(backend=None) -> ModuleSpec:
    """Pre-norm GDN layer: megatron-core TransformerLayer with the project's GDN mixer."""
    backend = backend or LocalBackend()
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=backend.norm(),
        self_attention=ModuleSpec(module=OlmoGatedDeltaNet, submodules=GatedDeltaNetSubmodules(
            in_proj=backend.gdn_in_proj_linear(), out_proj=backend.row_parallel_linear())),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=backend.norm(),
        mlp=_mlp_spec(backend),
        mlp_bda=get_bias_dropout_add))


def attention_layer_spec(backend=None) -> ModuleSpec:
    """Post-norm attention layer (no input norm)."""
    backend = backend or LocalBackend()
    return ModuleSpec(module=OlmoPostNormLayer, submodules=OlmoPostNormLayerSubmodules(
        self_attention=ModuleSpec(module=OlmoSelfAttention, submodules=OlmoAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            linear_proj=backend.row_parallel_linear())),
        mlp=_mlp_spec(backend),
        post_self_attn_layernorm=backend.norm(),
        post_mlp_layernorm=backend.norm()))


def hybrid_block_spec(layer_types: Sequence[str], backend=None) -> TransformerBlockSubmodules:
    """Block spec for the given layers (those of one pipeline stage), plus the final norm.

    Args:
        layer_types: ``"G"`` / ``"*"`` per layer of this stage.
        backend: a backend provider (default LocalBackend).

    Raises: ValueError for an unknown layer kind.
    """
    backend = backend or LocalBackend()
    specs: list[ModuleSpec] = []
    for i, t in enumerate(layer_types):
        if t == GDN:
            specs.append(gdn_layer_spec(backend))
        elif t == ATTENTION:
            specs.append(attention_layer_spec(backend))
        else:
            raise ValueError(f"layer {i}: unknown layer kind {t!r} (expected 'G' or '*')")
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=backend.norm())
