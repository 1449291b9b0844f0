"""Dist checkpoints reshard: saved at TP=2 x PP=2, loaded at TP=1 (and back) bit-exactly, for the
fused GDN in_proj / conv, GQA linear_qkv, q/k norm slices and vocab-parallel tensors."""
from __future__ import annotations

import pytest
import torch

from megatron_hybrid.checkpoint.storage import (
    load_model_checkpoint,
    model_config_from_checkpoint,
    read_run_config,
    save_checkpoint,
)
from megatron_hybrid.hf.mapping import local_state_dict
from megatron_hybrid.model import OlmoHybridModel
from tests.dist import run_distributed
from tests.model_utils import build_loaded_model, reference_setup

pytestmark = pytest.mark.distributed


def _save(rank, variation, root, tp, pp):
    _, cfg, weights = reference_setup(variation)
    model = build_loaded_model(cfg, weights, tp, pp)
    save_checkpoint(root, 7, model, cfg)


def _load_and_compare(rank, variation, root, tp, pp):
    from megatron.core import parallel_state as ps

    _, cfg, weights = reference_setup(variation)
    cfg2 = model_config_from_checkpoint(root)
    assert cfg2 == cfg
    model = OlmoHybridModel(cfg, cfg.to_transformer_config(tp, pp))
    assert load_model_checkpoint(root, model) == 7
    own = model.state_dict()
    want = local_state_dict(weights, cfg, ps.get_tensor_model_parallel_rank(), tp,
                            model.stage_layers, own)
    return [k for k, v in want.items() if not torch.equal(own[k], v)]


@pytest.mark.parametrize("variation,save_layout,load_layout", [
    ("grouped_values", (2, 2), (1, 1)), ("gqa", (1, 1), (2, 2)), ("tied", (2, 2), (1, 2))])
def test_save_one_layout_load_another_bit_exact(tmp_path, variation, save_layout, load_layout):
    root = str(tmp_path / "ckpt")
    tp, pp = save_layout
    run_distributed(_save, tp * pp, variation, root, tp, pp, tp=tp, pp=pp)
    rc = read_run_config(root)
    assert rc["iteration"] == 7 and rc["parallel"]["tensor_model_parallel_size"] == tp
    tp2, pp2 = load_layout
    bad = run_distributed(_load_and_compare, tp2 * pp2, variation, root, tp2, pp2, tp=tp2, pp=pp2)
    assert not any(bad), bad
