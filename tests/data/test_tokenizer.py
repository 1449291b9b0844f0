"""build_tokenizer: both kinds, eod/pad discovery, overrides and the flag-naming errors."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from megatron_hybrid.data.tokenizer import build_tokenizer

TEXT = "The quick brown fox, café and 東京: 12345 tokens.\nSecond line."


def test_hf_file_and_directory(tiny_hf_tokenizer):
    from tokenizers import Tokenizer as HF

    ref = HF.from_file(tiny_hf_tokenizer)
    for model in (tiny_hf_tokenizer, os.path.dirname(tiny_hf_tokenizer)):
        tok = build_tokenizer("HuggingFaceTokenizer", model)
        assert tok.eod == ref.token_to_id("<|endoftext|>") == 0
        assert tok.pad == ref.token_to_id("<|pad|>") == 1
        assert tok.bos is None
        assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
        ids = tok.encode(TEXT)
        assert ids == ref.encode(TEXT, add_special_tokens=False).ids
        assert tok.decode(ids) == TEXT
        assert tok.describe() == {"tokenizer_type": "HuggingFaceTokenizer",
                                  "tokenizer_model": os.path.abspath(tiny_hf_tokenizer),
                                  "vocab_size": tok.vocab_size, "eod": 0, "pad": 1}


def test_hf_config_beside_names_eos(tiny_hf_tokenizer, tmp_path):
    shutil.copy(tiny_hf_tokenizer, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|pad|>"}, "pad_token": "<|endoftext|>"}))
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    assert (tok.eod, tok.pad) == (1, 0)


def test_hf_without_end_of_text_token(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<stop>": 3}
    hf = HF(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="--eod-token"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path), eod_token="<stop>")
    assert (tok.eod, tok.pad, tok.vocab_size) == (3, -1, 4)
    assert tok.encode("hello world") == [1, 2]


def test_sentencepiece(tiny_sp_model):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=tiny_sp_model)
    tok = build_tokenizer("SentencePieceTokenizer", tiny_sp_model)
    assert tok.eod == ref.piece_to_id("</s>") == 2
    assert tok.pad == -1  # trained with the library default pad_id=-1
    assert tok.bos == 1 and tok.vocab_size == ref.get_piece_size() == 400
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    assert ids == ref.encode(text) and tok.eod not in ids and tok.bos not in ids
    assert tok.decode(ids) == text
    assert tok.describe()["tokenizer_model"] == os.path.abspath(tiny_sp_model)


@pytest.mark.parametrize("override,expected", [("<s>", 1), (1, 1), ("3", 3), ("<unk>", 0)])
def test_eod_override(tiny_sp_model, override, expected):
    assert build_tokenizer("SentencePieceTokenizer", tiny_sp_model, override).eod == expected


def test_eod_override_hf(tiny_hf_tokenizer):
    assert build_tokenizer("HuggingFaceTokenizer", tiny_hf_tokenizer, "<|pad|>").eod == 1


@pytest.mark.parametrize("override", ["<nope>", 400, "99999"])
def test_eod_not_in_vocabulary(tiny_sp_model, override):
    with pytest.raises(ValueError, match="--eod-token"):
        build_tokenizer("SentencePieceTokenizer", tiny_sp_model, override)


def test_errors_name_flag_and_path(tiny_hf_tokenizer, tiny_sp_model, tmp_path):
    missing = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match=f"--tokenizer-model {missing}"):
        build_tokenizer("SentencePieceTokenizer", missing)
    with pytest.raises(ValueError, match=f"--tokenizer-model {tmp_path}.*no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    with pytest.raises(ValueError, match="--tokenizer-type 'GPT2BPETokenizer'"):
        build_tokenizer("GPT2BPETokenizer", tiny_hf_tokenizer)
    with pytest.raises(ValueError, match="SentencePieceTokenizer"):  # a .model given as HF
        build_tokenizer("HuggingFaceTokenizer", tiny_sp_model)
    with pytest.raises(ValueError, match="HuggingFaceTokenizer"):  # a tokenizer.json given as SP
        build_tokenizer("SentencePieceTokenizer", tiny_hf_tokenizer)
    text = tmp_path / "notes.txt"
    text.write_text("not a tokenizer")
    with pytest.raises(ValueError, match=f"--tokenizer-model {text}"):
        build_tokenizer("SentencePieceTokenizer", str(text))
    with pytest.raises(ValueError, match=f"--tokenizer-model {text}"):
        build_tokenizer("HuggingFaceTokenizer", str(text))


def test_dolma2(dolma2_tokenizer):
    tok = build_tokenizer("HuggingFaceTokenizer", dolma2_tokenizer)
    assert (tok.vocab_size, tok.eod, tok.pad, tok.bos) == (100278, 100257, 100277, None)
    ids = tok.encode(TEXT)
    assert tok.eod not in ids and tok.decode(ids) == TEXT
