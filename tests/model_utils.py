"""Helpers shared by the layer and model tests: build a model at a layout, load global weights,
collect gradients under global names, and merge what the ranks return."""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from megatron_hybrid.hf.mapping import (
    config_from_hf,
    hf_to_megatron,
    is_tp_sharded,
    load_global_into_model,
    tp_merge,
)
from megatron_hybrid.model import OlmoHybridModel
from tests.hf_models import make_hf_model

_LAYER_PREFIX = "decoder.layers."


def reference_setup(variation: str = "base", seed: int = 0):
    """(hf_model, OlmoHybridConfig, global Megatron weights) for a tiny variation."""
    hf, hcfg = make_hf_model(variation, seed=seed)
    cfg = config_from_hf(hcfg.to_dict())
    return hf, cfg, hf_to_megatron(hf.state_dict(), cfg)


def build_loaded_model(cfg, weights, tp=1, pp=1, sp=False, **overrides):
    """OlmoHybridModel for this rank at (tp, pp, sp) holding ``weights`` (global dict)."""
    model = OlmoHybridModel(cfg, cfg.to_transformer_config(tp, pp, sequence_parallel=sp,
                                                           **overrides))
    load_global_into_model(model, weights, cfg)
    return model


def global_name(model, local_key: str) -> str:
    if local_key.startswith(_LAYER_PREFIX):
        idx, rest = local_key[len(_LAYER_PREFIX):].split(".", 1)
        return f"{_LAYER_PREFIX}{model.stage_layers[int(idx)]}.{rest}"
    return local_key


def rank_grads(model) -> dict[str, dict]:
    """{global name: {"grad", "tp_rank", "sequence_parallel"}} for this rank's parameters."""
    out = {}
    for key, p in model.named_parameters():
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None or p.grad is not None else g
        out[global_name(model, key)] = {
            "grad": None if g is None else g.detach().float().clone(),
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "sequence_parallel": bool(getattr(p, "sequence_parallel", False))}
    return out


def merge_grads(per_rank: list[dict[str, dict]], cfg) -> dict[str, torch.Tensor]:
    """Global gradients from every rank's ``rank_grads``.

    TP-sharded tensors are concatenated (``tp_merge``); replicated tensors tagged
    ``sequence_parallel`` hold partial sums (no finalize_model_grads ran), so they are summed;
    other replicated tensors must already agree across TP ranks and are taken from TP rank 0. With
    tied embeddings split over PP the two copies' gradients are summed, as megatron does.
    """
    by_name: dict[str, dict[int, dict]] = {}
    for r in per_rank:
        for name, e in r.items():
            by_name.setdefault(name, {})[e["tp_rank"]] = e
    out = {}
    for name, ranks in by_name.items():
        entries = [ranks[k] for k in sorted(ranks)]
        grads = [e["grad"] for e in entries]
        if is_tp_sharded(name, cfg):
            out[name] = tp_merge(name, grads, cfg)
        elif entries[0]["sequence_parallel"]:
            out[name] = torch.stack(grads).sum(0)
        else:
            out[name] = grads[0]
    if "output_layer.weight" in out and not cfg.untie_embeddings_and_output_weights:
        out["embedding.word_embeddings.weight"] = (out["embedding.word_embeddings.weight"]
                                                   + out.pop("output_layer.weight"))
    return out


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Norm-wise relative difference per tensor name (names must match)."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return {k: float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a}
