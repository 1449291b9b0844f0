"""Layout grammar, config validation, presets (docs/model.md §1, §7; docs/design.md §4, §6a)."""
from __future__ import annotations

import pytest

from megatron_hybrid.config import ConfigError, OlmoHybridConfig, pad_vocab_size, preset_config
from megatron_hybrid.config.layout import LayoutError, parse_layout, pattern_from_attention_freq


def test_parse_olmo_pattern():
    lay = parse_layout("G-G-G-*-" * 8, num_layers=32)
    assert lay.layer_types.count("G") == 24 and lay.layer_types.count("*") == 8
    assert [i for i, t in enumerate(lay.layer_types) if t == "*"] == list(range(3, 32, 4))
    assert lay.stage_sizes is None
    assert lay.hf_layer_types()[3] == "full_attention"


def test_parse_stages_and_roundtrip():
    lay = parse_layout("G-G-G-|*-G-")
    assert lay.stage_sizes == (3, 2)
    assert lay.pattern() == "G-G-G-|*-G-"
    assert parse_layout(lay.pattern()) == lay


@pytest.mark.parametrize("bad,where", [
    ("G-G*-", "position 2"), ("-G-", "position 0"), ("G-X-", "'X' at position 2"),
    ("G-||G-", "empty pipeline stage"), ("G-|", "empty last"), ("", "empty")])
def test_layout_errors_name_the_position(bad, where):
    with pytest.raises(LayoutError, match=where):
        parse_layout(bad)


def test_layer_count_must_match():
    with pytest.raises(LayoutError, match="3 mixers but --num-layers is 4"):
        parse_layout("G-G-*-", num_layers=4)


def test_attention_freq_expansion():
    assert pattern_from_attention_freq(8, 4) == "G-G-G-*-" * 2
    assert pattern_from_attention_freq(4, 2) == "G-*-G-*-"


def test_7b_preset_counts_match_spec():
    cfg = preset_config("olmo_hybrid_7b")
    assert cfg.padded_vocab_size == 100352 == pad_vocab_size(100278)
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    kd = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    vd = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    hv = cfg.linear_num_value_heads
    mlp = 3 * d * f
    gdn_mixer = d * (2 * kd + 2 * vd) + vd * d + 2 * hv * d + 4 * (2 * kd + vd) + 2 * hv + \
        cfg.linear_value_head_dim
    gdn_layer = gdn_mixer + mlp + 2 * d
    attn_layer = 4 * d * d + 2 * d + mlp + 2 * d
    total = 24 * gdn_layer + 8 * attn_layer + 2 * cfg.padded_vocab_size * d + d
    assert (mlp, gdn_mixer, gdn_layer, attn_layer) == (126812160, 88750332, 215570172, 185809920)
    assert total == 7430870688  # docs/model.md §1


def test_allowed_tp_for_7b_and_1b():
    assert preset_config("olmo_hybrid_7b").allowed_tensor_parallel_sizes(8) == [1, 2]
    assert preset_config("olmo_hybrid_1b").allowed_tensor_parallel_sizes(8) == [1, 2, 4, 8]


def test_tp4_refused_with_reason_for_7b():
    with pytest.raises(ConfigError) as e:
        preset_config("olmo_hybrid_7b").validate_parallel(4, 1)
    msg = str(e.value)
    assert "--tensor-model-parallel-size 4" in msg and "--num-attention-heads = 30" in msg
    assert "--ffn-hidden-size = 11008" not in msg  # 11008 is divisible by 4
    assert "allowed values for this model: [1, 2]" in msg


def test_pp_stage_checks():
    cfg = OlmoHybridConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128,
                           num_attention_heads=4, vocab_size=256,
                           hybrid_layer_pattern="G-G-G-|*-")
    cfg.validate_parallel(1, 2)
    assert cfg.stage_sizes(2) == [3, 1]
    with pytest.raises(ConfigError, match="2 pipeline stages"):
        cfg.validate_parallel(1, 4)
    even = OlmoHybridConfig(num_layers=3, hidden_size=64, ffn_hidden_size=128,
                            num_attention_heads=4, vocab_size=256, hybrid_layer_pattern="G-G-*-")
    with pytest.raises(ConfigError, match="not divisible by --pipeline-model-parallel-size 2"):
        even.stage_sizes(2)


def test_config_dict_roundtrip_and_unknown_keys():
    cfg = preset_config("tiny", vocab_size=1000)
    assert OlmoHybridConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model config keys"):
        OlmoHybridConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="--model-preset 'huge'"):
        preset_config("huge")
