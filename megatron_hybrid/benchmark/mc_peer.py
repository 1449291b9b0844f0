"""megatron-core 0.16's own ``GatedDeltaNet`` in a hybrid stack, without Transformer Engine.

megatron-core 0.16 builds GDN hybrids only through
``get_transformer_block_with_experimental_attention_variant_spec``, which is Transformer-Engine
only (``docs/megatron_core_notes.md`` §7). ``te_only_findings`` records, on the machine at hand, each
step that blocks it (the exception type and text):

1. the block spec with ``transformer_impl="local"``: an AssertionError (TE only);
2. with ``transformer_impl="transformer_engine"`` and TE absent: ``TESpecProvider`` is undefined;
3. ``get_gated_delta_net_module_spec(config, backend=LocalSpecProvider())``: the spec builds,
   but ``in_proj`` is ``column_parallel_layer_norm_linear()`` = None for the local backend (the
   input RMSNorm is meant to be fused into in_proj, ``metainfo fuse_input_layernorm=True``, so
   the layer would also drop its input norm): building GatedDeltaNet from it fails;
4. the standard-attention spec of the hybrid block: ``get_gpt_layer_with_transformer_engine_spec``.

``mc_block_spec`` then assembles the local variant by hand: megatron-core's ``TransformerLayer``
(pre-norm) with ``WrappedTorchNorm`` norms, megatron-core's ``GatedDeltaNet`` (in_proj =
ColumnParallelLinear, out_norm = WrappedTorchNorm (torch RMSNorm), out_proj = RowParallelLinear)
and megatron-core's local MLP for the GDN layers; the project's post-norm attention layer for the
attention layers (megatron-core has no Olmo post-norm attention layer, and its local
DotProductAttention materializes the [S, S] scores), inside ``OlmoHybridModel`` and the training
path of ``ours``. Its parameter names equal ours, so ours' weights load into it.

Semantics of megatron-core's GDN differ from Olmo Hybrid (docs/model.md §7: beta = sigmoid, not
2 sigmoid; out_norm eps 1e-6 rounded before the gate; A_log.exp() in the parameter dtype; fla's
l2norm as separate kernels; nn.Conv1d without causal_conv1d): its loss is not expected to equal
ours, its speed is what is compared.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.config.layout import GDN

ASSEMBLED = ("megatron-core TransformerLayer (pre-norm, WrappedTorchNorm) with megatron-core "
             "GatedDeltaNet (in_proj ColumnParallelLinear, out_norm WrappedTorchNorm, out_proj "
             "RowParallelLinear) and the local MLP for G layers; the project's post-norm "
             "attention layer for * layers; OlmoHybridModel / DDP / distributed optimizer as ours")


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def te_only_findings(cfg: OlmoHybridConfig, dtype: torch.dtype) -> list[dict]:
    """Try megatron-core's own GDN hybrid spec path without TE; [{"step", "result"}] per step."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt import experimental_attention_variant_module_specs as ex
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    def tcfg(impl):
        return cfg.to_transformer_config(
            1, 1, params_dtype=dtype, bf16=dtype == torch.bfloat16,
            experimental_attention_variant="gated_delta_net", linear_attention_freq=4,
            transformer_impl=impl)

    out = []

    def attempt(step, fn):
        try:
            result = fn()
            out.append({"step": step, "result": f"OK{': ' + result if result else ''}"})
        except Exception as exc:  # recorded, never raised: these are findings
            out.append({"step": step, "result": _err(exc)})

    attempt("get_transformer_block_with_experimental_attention_variant_spec, "
            "transformer_impl='local'",
            lambda: ex.get_transformer_block_with_experimental_attention_variant_spec(
                tcfg("local")) and "")
    attempt("the same, transformer_impl='transformer_engine' (TE "
            f"{'importable' if ex.HAVE_TE else 'not importable'})",
            lambda: ex.get_transformer_block_with_experimental_attention_variant_spec(
                tcfg("transformer_engine")) and "")

    def gdn_spec_local():
        c = tcfg("local")
        spec = ex.get_gated_delta_net_module_spec(c, backend=LocalSpecProvider())
        out.append({"step": "get_gated_delta_net_module_spec(backend=LocalSpecProvider())",
                    "result": f"spec built: in_proj={spec.submodules.in_proj}, "
                              f"out_norm={spec.submodules.out_norm.__name__}, "
                              f"metainfo={spec.metainfo}"})
        build_module(spec, config=c, layer_number=1,
                     pg_collection=ProcessGroupCollection.use_mpu_process_groups())
        return "GatedDeltaNet built from it"

    attempt("build GatedDeltaNet from that local spec", gdn_spec_local)
    attempt("_get_self_attention_module_spec(backend=LocalSpecProvider()) (the hybrid block's "
            "attention layers)",
            lambda: ex._get_self_attention_module_spec(tcfg("local"),
                                                      backend=LocalSpecProvider()) and "")
    return out


def mc_block_spec(layer_types: Sequence[str], backend):
    """Decoder-block spec with megatron-core's GatedDeltaNet for ``G`` layers (local modules)
    and the project's attention layer for ``*`` layers; signature of
    ``layers.layer_specs.hybrid_block_spec`` (for ``ours.block_spec_override``)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from megatron_hybrid.layers.layer_specs import attention_layer_spec

    local = LocalSpecProvider()
    norm = local.layer_norm(rms_norm=True)
    gdn = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=ModuleSpec(module=GatedDeltaNet, submodules=GatedDeltaNetSubmodules(
            in_proj=local.column_parallel_linear(), out_norm=norm,
            out_proj=local.row_parallel_linear())),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=norm,
        mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=local.column_parallel_linear(), linear_fc2=local.row_parallel_linear())),
        mlp_bda=get_bias_dropout_add))
    specs = [gdn if t == GDN else attention_layer_spec(backend) for t in layer_types]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm)


@contextlib.contextmanager
def cpu_stand_ins(device: torch.device):
    """Without fla on CPU (``--smoke``), give megatron-core's GDN module the project's PyTorch
    l2norm and chunked gated delta rule in place of fla's (its module globals ``HAVE_FLA``,
    ``l2norm``, ``chunk_gated_delta_rule``, ``docs/megatron_core_notes.md`` §7); restored on exit.
    Yields a note, or None where nothing was replaced (a GPU: megatron-core then uses fla, or
    raises its own ImportError)."""
    import megatron.core.ssm.gated_delta_net as mc_gdn

    if device.type == "cuda" or mc_gdn.HAVE_FLA:
        yield None
        return
    from megatron_hybrid.kernels import chunk_gated_delta_rule_torch, l2_norm

    def chunk(q, k, v, g=None, beta=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, **_):
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=initial_state,
                                            output_final_state=output_final_state,
                                            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)

    saved = {n: getattr(mc_gdn, n, None) for n in ("HAVE_FLA", "l2norm", "chunk_gated_delta_rule")}
    mc_gdn.HAVE_FLA, mc_gdn.l2norm, mc_gdn.chunk_gated_delta_rule = True, l2_norm, chunk
    try:
        yield ("CPU smoke: fla is absent, megatron-core's GDN ran with the project's PyTorch "
               "l2norm and chunked gated delta rule in place of fla's")
    finally:
        for n, v in saved.items():
            setattr(mc_gdn, n, v)


def mc_kernel_bindings() -> dict:
    """Where megatron-core's GDN gets its kernels on this machine."""
    import megatron.core.jit as jit
    import megatron.core.ssm.gated_delta_net as mc_gdn

    from megatron_hybrid.benchmark.diagnostics import _origin

    return {"HAVE_FLA": bool(mc_gdn.HAVE_FLA),
            "l2norm": _origin(mc_gdn.l2norm) if getattr(mc_gdn, "l2norm", None) else None,
            "chunk_gated_delta_rule": (_origin(mc_gdn.chunk_gated_delta_rule)
                                       if mc_gdn.chunk_gated_delta_rule else None),
            "causal_conv1d_fn": (_origin(mc_gdn.causal_conv1d_fn) if mc_gdn.causal_conv1d_fn
                                 else "None (nn.Conv1d + activation)"),
            "jit_fuser (gated norm)": _origin(jit.jit_fuser)}
