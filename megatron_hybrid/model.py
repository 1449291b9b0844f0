"""Olmo Hybrid language model on megatron-core, one pipeline stage per process.

Letters: B micro-batch, T (= S) sequence length, D hidden size, V padded vocabulary
(V/TP per rank before gathering).

The model is megatron-core's ``GPTModel`` (vocab-parallel embedding, RoPE, output layer, tied
embeddings across pipeline stages, loss) whose decoder block is built from the Olmo Hybrid layout:
each pipeline stage builds only its own slice of the pattern (``docs/design.md`` §4).
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_hybrid.config import OlmoHybridConfig
from megatron_hybrid.layers.layer_specs import get_backend, hybrid_block_spec


def stage_layer_range(transformer_config, pp_rank: int | None = None,
                      vp_stage: int | None = None) -> range:
    """Global (0-based) layer indices built by pipeline rank ``pp_rank`` (default: this rank)."""
    if pp_rank is None:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    offset = get_transformer_layer_offset(transformer_config, vp_stage, pp_rank)
    n = get_num_layers_to_build(transformer_config, vp_stage, pp_rank)
    return range(offset, offset + n)


class OlmoHybridModel(GPTModel):
    """Olmo Hybrid causal LM (spec ``docs/model.md`` §1-§4) for the local pipeline stage.

    Args:
        model_config: OlmoHybridConfig (shape, vocabulary, positions).
        transformer_config: from ``model_config.to_transformer_config(...)`` for this layout.
        pre_process / post_process: whether this stage holds the embedding / the output layer;
            default: first / last pipeline stage.
        backend: layer backend name (``local`` or ``transformer_engine``).
        pg_collection: megatron-core ProcessGroupCollection; default: parallel_state's groups
            (the tuner passes one without groups to build a stage on the meta device).

    Forward (megatron-core GPTModel): input_ids [B, T], position_ids [B, T], attention_mask None
    (causal), labels [B, T] or None -> per-token loss [B, T] when labels are given, else logits
    [B, T, V/TP] (last stage) or hidden states [T, B, D] (other stages).
    """

    def __init__(self, model_config: OlmoHybridConfig, transformer_config,
                 pre_process: bool | None = None, post_process: bool | None = None,
                 vp_stage: int | None = None, backend: str = "local", pg_collection=None):
        if pre_process is None:
            pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        if post_process is None:
            post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.model_config = model_config
        layers = stage_layer_range(transformer_config, vp_stage=vp_stage)
        types = [model_config.layout.layer_types[i] for i in layers]
        spec = hybrid_block_spec(types, get_backend(backend))
        super().__init__(
            config=transformer_config,
            transformer_layer_spec=spec,
            vocab_size=model_config.padded_vocab_size,
            max_sequence_length=model_config.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=not model_config.untie_embeddings_and_output_weights,
            position_embedding_type=model_config.position_embedding_type,
            rotary_base=model_config.rotary_base,
            vp_stage=vp_stage,
            pg_collection=pg_collection,
        )
        self.stage_layers = layers
        if getattr(self, "rotary_pos_emb", None) is not None:
            # head-parallel CP (layers/context_parallel.py) applies RoPE to the whole sequence
            # after its all-to-all: the embedding must not be sliced per CP rank
            self.rotary_pos_emb.cp_group = None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None):
        """Dist-checkpoint view with one key per global layer (``decoder.layers.{i}.``).

        The layer kinds hold different tensors, so megatron-core's stacked layout (one tensor per
        name with a leading layer axis) does not apply: ``non_homogeneous_layers`` is forced on.
        """
        metadata = dict(metadata or {})
        metadata["non_homogeneous_layers"] = True
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """All-gather vocab-parallel logits over TP: [B, T, V/TP] -> [B, T, V]."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    return gather_from_tensor_model_parallel_region(logits)
