"""HF <-> Megatron mapping (docs/model.md §6-§7): bit-exact round trips, the release layout, aliases,
clear errors, TP slicing, and transformers loading what the exporter writes."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_hybrid.hf.mapping import (
    config_from_hf,
    config_to_hf,
    hf_to_megatron,
    megatron_to_hf,
    tp_merge,
    tp_shard,
)
from tests.hf_models import VARIATIONS, hf_logits, make_hf_model, release_state_dict


def _release_layout(hf_sd, cfg):
    return release_state_dict(hf_sd, cfg)


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_hf_megatron_hf_bit_exact(variation):
    hf, hcfg = make_hf_model(variation)
    cfg = config_from_hf(hcfg.to_dict())
    release = _release_layout(hf.state_dict(), cfg)
    back = megatron_to_hf(hf_to_megatron(release, cfg), cfg)
    assert set(back) == set(release)
    for k in release:
        assert back[k].dtype == release[k].dtype and torch.equal(back[k], release[k]), k
    # the fused in-memory conv layout imports to the same Megatron tensors
    fused = {k: v for k, v in hf.state_dict().items()}
    if not cfg.untie_embeddings_and_output_weights:
        fused.pop("lm_head.weight", None)
    a, b = hf_to_megatron(fused, cfg), hf_to_megatron(release, cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_roundtrip_keeps_dtype_and_bits():
    hf, hcfg = make_hf_model("base")
    cfg = config_from_hf(hcfg.to_dict())
    release = {k: v.to(torch.bfloat16) for k, v in _release_layout(hf.state_dict(), cfg).items()}
    back = megatron_to_hf({k: v.float() for k, v in hf_to_megatron(release, cfg).items()}, cfg)
    for k in release:
        assert torch.equal(back[k].to(torch.bfloat16), release[k]), k


def test_aliases_are_accepted():
    hf, hcfg = make_hf_model("base")
    cfg = config_from_hf(hcfg.to_dict())
    release = _release_layout(hf.state_dict(), cfg)
    aliased = {}
    for k, v in release.items():
        k2 = k.replace("linear_attn.o_proj", "linear_attn.out_proj").replace(
            "linear_attn.o_norm", "linear_attn.norm")
        if ".0." in k or ".1." in k or ".2." in k:  # GDN layers: old norm names
            k2 = k2.replace("input_layernorm", "attention_layer_norm").replace(
                "post_attention_layernorm", "feedforward_layer_norm")
        aliased[k2] = v
    a, b = hf_to_megatron(aliased, cfg), hf_to_megatron(release, cfg)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_and_misshaped_tensors_are_named():
    hf, hcfg = make_hf_model("base")
    cfg = config_from_hf(hcfg.to_dict())
    sd = _release_layout(hf.state_dict(), cfg)
    sd.pop("model.layers.1.linear_attn.b_proj.weight")
    with pytest.raises(KeyError, match="model.layers.1.linear_attn.b_proj.weight"):
        hf_to_megatron(dict(sd), cfg)
    sd = _release_layout(hf.state_dict(), cfg)
    sd["model.layers.3.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"up_proj.weight.*\(3, 3\).*\(128, 64\)"):
        hf_to_megatron(sd, cfg)
    sd = _release_layout(hf.state_dict(), cfg)
    sd["model.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="does not use"):
        hf_to_megatron(sd, cfg)


def test_unknown_model_type_is_refused():
    _, hcfg = make_hf_model("base")
    d = hcfg.to_dict()
    d["model_type"] = "olmo3"
    with pytest.raises(ValueError, match="model_type is 'olmo3'"):
        config_from_hf(d)


@pytest.mark.parametrize("rope,expected", [
    (None, "none"), ({"rope_theta": None, "rope_type": "default"}, "none"),
    ({"rope_type": "default", "rope_theta": 10000.0}, "rope")])
def test_nope_detection(rope, expected):
    _, hcfg = make_hf_model("base")
    d = hcfg.to_dict()
    d["rope_parameters"] = rope
    assert config_from_hf(d).position_embedding_type == expected


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shard_merge_inverse(tp):
    hf, hcfg = make_hf_model("grouped_values")
    cfg = config_from_hf(hcfg.to_dict())
    g = hf_to_megatron(hf.state_dict(), cfg)
    for name, t in g.items():
        shards = [tp_shard(name, t, cfg, r, tp) for r in range(tp)]
        assert torch.equal(tp_merge(name, shards, cfg), t), name
    # the fused in_proj of rank 0 at TP=2 starts with q rows of heads [0, H/2)
    kd = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    name = "decoder.layers.0.self_attention.in_proj.weight"
    if tp == 2:
        r0 = tp_shard(name, g[name], cfg, 0, 2)
        assert torch.equal(r0[: kd // 2], g[name][: kd // 2])
        assert torch.equal(r0[kd // 2: kd], g[name][kd: kd + kd // 2])  # then k's first half


@pytest.mark.parametrize("variation", ["base", "nope", "tied", "default_head_dims"])
def test_exported_files_load_in_transformers(tmp_path, variation):
    from safetensors.torch import save_file
    from transformers import OlmoHybridForCausalLM

    hf, hcfg = make_hf_model(variation)
    cfg = config_from_hf(hcfg.to_dict())
    out = megatron_to_hf(hf_to_megatron(hf.state_dict(), cfg), cfg)
    save_file(out, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    reloaded = OlmoHybridForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert config_from_hf(json.loads((tmp_path / "config.json").read_text())) == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(reloaded, ids), hf_logits(hf, ids))


def test_default_save_pretrained_equal_chunk_convs_are_resplit(tmp_path):
    """transformers' default save splits the fused conv into equal chunks (docs/model.md §6 trap 2)."""
    from megatron_hybrid.hf.io import load_hf_state_dict

    hf, hcfg = make_hf_model("base")
    cfg = config_from_hf(hcfg.to_dict())
    hf.save_pretrained(str(tmp_path))  # default: split into q/k/v_conv1d of equal size
    stored = load_hf_state_dict(str(tmp_path))
    sizes = [stored[f"model.layers.0.linear_attn.{n}_conv1d.weight"].shape[0] for n in "qkv"]
    kd = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    assert sizes != [kd, kd, 2 * kd]  # the trap is really there
    a = hf_to_megatron(stored, cfg)
    b = hf_to_megatron(dict(hf.state_dict()), cfg)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fields,expected", [
    ({"rope_parameters": {"rope_type": "default"}}, ("rope", 10000.0)),
    ({"rope_theta": 500000.0, "rope_scaling": None}, ("rope", 500000.0)),
    ({}, ("rope", 10000.0)),
    ({"rope_theta": None}, ("none", None)),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, ("rope", 5e5))])
def test_rope_resolution_follows_transformers(fields, expected):
    _, hcfg = make_hf_model("base")
    d = {k: v for k, v in hcfg.to_dict().items() if k not in ("rope_parameters", "rope_theta",
                                                             "rope_scaling")}
    cfg = config_from_hf({**d, **fields})
    assert cfg.position_embedding_type == expected[0]
    if expected[1] is not None:
        assert cfg.rotary_base == expected[1]


def test_scaled_rope_is_refused():
    _, hcfg = make_hf_model("base")
    d = hcfg.to_dict()
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        config_from_hf(d)
