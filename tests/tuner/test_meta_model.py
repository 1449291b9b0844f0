"""The tuner's per-rank parameter list (``tuner/meta_model.py``) is the trainer's.

- On 4 forked gloo ranks (TP=2 x PP=2, the `tiny` preset with uneven stages 5 / 3, tied and
  untied embeddings) every rank's ``named_parameters()`` (names, order, elements) equals
  ``stage_parameters`` for that stage.
- The list assembled from one layer of each kind equals the full meta-device build of the stage
  (7B preset, several splits, TP 1 / 2, tied and untied).
- A few entries against the shapes of docs/model.md §3-§4 written from the config fields.
- The build needs no process group and leaves megatron-core's parallel state as it found it.
"""
from __future__ import annotations

import dataclasses

import megatron.core.parallel_state as ps
import pytest
import torch

from megatron_hybrid.config import preset_config
from megatron_hybrid.model import OlmoHybridModel
from megatron_hybrid.tuner.meta_model import (
    build_meta_stage,
    model_pieces,
    rank_numel,
    stage_parameters,
)
from tests.dist import run_distributed

TINY_UNEVEN = dict(hybrid_layer_pattern="G-G-G-*-G-|G-G-*-")


def _tiny(tied: bool):
    return preset_config("tiny", untie_embeddings_and_output_weights=not tied, **TINY_UNEVEN)


def _named_parameters_worker(rank, tied):
    cfg = _tiny(tied)
    tcfg = cfg.to_transformer_config(2, 2)
    model = OlmoHybridModel(cfg, tcfg)
    return {"tp": ps.get_tensor_model_parallel_rank(), "pp": ps.get_pipeline_model_parallel_rank(),
            "params": [(n, p.numel()) for n, p in model.named_parameters()]}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tied", [False, True])
def test_stage_parameters_equal_the_trainers_named_parameters(tied):
    results = run_distributed(_named_parameters_worker, 4, tied, tp=2, pp=2, timeout=300)
    assert sorted((r["tp"], r["pp"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    cfg = _tiny(tied)
    for r in results:
        assert r["params"] == stage_parameters(cfg, 2, (5, 3), r["pp"]), (r["tp"], r["pp"])
    last = [n for n, _ in next(r for r in results if r["pp"] == 1)["params"]]
    assert "output_layer.weight" in last  # the tied copy lives on the last stage too


def _full_build(cfg, tp, sizes, rank):
    start = sum(sizes[:rank])
    types = cfg.layout.layer_types[start:start + sizes[rank]]
    model = build_meta_stage(cfg, types, rank == 0, rank == len(sizes) - 1)
    return [(n, rank_numel(s, d, tp)) for n, s, d in model_pieces(model)]


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_assembled_list_equals_the_full_meta_build(tied):
    cfg = preset_config("olmo_hybrid_7b", untie_embeddings_and_output_weights=not tied)
    for tp in (1, 2):
        for sizes in ((32,), (17, 15), (5, 22, 5)):
            for rank in range(len(sizes)):
                assert stage_parameters(cfg, tp, sizes, rank) == _full_build(cfg, tp, sizes, rank), \
                    (tp, sizes, rank)


def test_entries_match_the_specs_shapes():
    cfg = preset_config("olmo_hybrid_7b")
    tp, D, F = 2, cfg.hidden_size, cfg.ffn_hidden_size
    H, HV, Dk, Dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads,
                     cfg.linear_key_head_dim, cfg.linear_value_head_dim)
    Ha, G, Dh = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    got = dict(stage_parameters(cfg, tp, (cfg.num_layers,), 0))
    g, a = "decoder.layers.0.", f"decoder.layers.{cfg.layout.layer_types.index('*')}."
    expected = {
        "embedding.word_embeddings.weight": cfg.padded_vocab_size // tp * D,
        g + "input_layernorm.weight": D,                                  # replicated
        g + "self_attention.in_proj.weight": (2 * H * Dk + 2 * HV * Dv + 2 * HV) // tp * D,
        g + "self_attention.conv1d.weight": (2 * H * Dk + HV * Dv) // tp * cfg.linear_conv_kernel_dim,
        g + "self_attention.A_log": HV // tp,
        g + "self_attention.out_norm.weight": Dv,                         # one weight, all heads
        g + "self_attention.out_proj.weight": D * (HV * Dv // tp),
        g + "mlp.linear_fc1.weight": 2 * F // tp * D,
        g + "mlp.linear_fc2.weight": D * (F // tp),
        a + "self_attention.linear_qkv.weight": (Ha + 2 * G) * Dh // tp * D,
        a + "self_attention.q_layernorm.weight": Ha * Dh // tp,           # full-width QK-norm
        a + "self_attention.linear_proj.weight": D * (Ha * Dh // tp),
        a + "post_mlp_layernorm.weight": D,
        "decoder.final_layernorm.weight": D,
        "output_layer.weight": cfg.padded_vocab_size // tp * D,
    }
    assert {k: got[k] for k in expected} == expected
    assert a + "input_layernorm.weight" not in got  # attention layers are post-norm


def test_build_needs_no_process_group_and_restores_parallel_state():
    cfg = dataclasses.replace(preset_config("tiny"), num_layers=2, hybrid_layer_pattern="*-G-")
    initialised = torch.distributed.is_initialized()  # False when run alone: no group needed
    sentinel = (ps._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE, ps._MPU_PIPELINE_MODEL_PARALLEL_RANK)
    ps.set_tensor_model_parallel_world_size(7)
    ps.set_pipeline_model_parallel_rank(3)
    try:
        model = build_meta_stage(cfg, ("*", "G"), True, True)
        assert (ps._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE, ps._MPU_PIPELINE_MODEL_PARALLEL_RANK) \
            == (7, 3)
    finally:
        ps.set_tensor_model_parallel_world_size(sentinel[0])
        ps.set_pipeline_model_parallel_rank(sentinel[1])
    assert torch.distributed.is_initialized() == initialised
    # only the GDN conv (torch.nn.utils.skip_init places it on the CPU) holds memory
    assert {n for n, p in model.named_parameters() if p.device.type != "meta"} == {
        "decoder.layers.1.self_attention.conv1d.weight"}
