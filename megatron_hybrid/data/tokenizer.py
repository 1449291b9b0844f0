"""Tokenizers behind Megatron's ``--tokenizer-type`` / ``--tokenizer-model`` flags.

Two kinds, with Megatron's names:

- ``HuggingFaceTokenizer``: a ``tokenizer.json`` file, or a directory holding one (loaded with the
  ``tokenizers`` library; transformers is not needed). The end-of-document token is the ``eos_token``
  of a ``tokenizer_config.json`` / ``special_tokens_map.json`` beside it, else the first known
  end-of-text token in the vocabulary (``<|endoftext|>``, ``</s>``, ...). dolma2: 100,278 ids,
  eod 100257 ``<|endoftext|>``, pad 100277 ``<|pad|>``, no bos (docs/model.md §9).
- ``SentencePieceTokenizer``: a SentencePiece ``.model`` file; eod is its ``</s>`` (``eos_id``).

The ``Tokenizer`` object duck-types what megatron-core's ``GPTDataset`` reads from a tokenizer
(``vocab_size``, ``eod``, ``pad``). ``encode`` never adds special tokens. This module imports
neither torch nor megatron-core, so preprocessing workers start fast.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer")

EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
"""End-of-text tokens tried, in order, when no tokenizer config names an ``eos_token``."""

PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")
"""Pad tokens tried, in order, when no tokenizer config names a ``pad_token``."""


class Tokenizer:
    """A loaded tokenizer with megatron-core's duck-typed fields.

    Attributes:
        tokenizer_type: ``"HuggingFaceTokenizer"`` or ``"SentencePieceTokenizer"``.
        tokenizer_model: absolute path of the ``tokenizer.json`` / ``.model`` file.
        vocab_size: number of ids, including added and special tokens (largest id + 1).
        eod: end-of-document id. pad: pad id, or -1 when the tokenizer has none.
        bos: beginning-of-sequence id, or None.
    """

    def __init__(self, tokenizer_type: str, tokenizer_model: str, backend, vocab_size: int,
                 eod: int, pad: int, bos: int | None):
        self.tokenizer_type = tokenizer_type
        self.tokenizer_model = tokenizer_model
        self._backend = backend
        self.vocab_size = int(vocab_size)
        self.eod = int(eod)
        self.pad = int(pad)
        self.bos = None if bos is None else int(bos)

    @property
    def eos(self) -> int:
        """Alias of ``eod`` (megatron-core tokenizers expose both)."""
        return self.eod

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (list of int), with no special tokens added.
        Raises UnicodeEncodeError for strings holding lone surrogates."""
        if self.tokenizer_type == "HuggingFaceTokenizer":
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (any iterable of ints, e.g. a numpy array), special tokens kept."""
        ids = [int(i) for i in ids]
        if self.tokenizer_type == "HuggingFaceTokenizer":
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._backend.decode(ids)

    @property
    def unique_identifiers(self) -> dict:
        """What megatron-core's datasets hash into their cache keys (``MegatronDataset`` serializes
        the config's tokenizer through this attribute)."""
        return {"class": type(self).__name__, **self.describe()}

    def describe(self) -> dict:
        """The tokenizer as recorded in ``run_config.yaml``: type, absolute model path, vocab size,
        eod and pad ids."""
        return {
            "tokenizer_type": self.tokenizer_type,
            "tokenizer_model": self.tokenizer_model,
            "vocab_size": self.vocab_size,
            "eod": self.eod,
            "pad": self.pad,
        }

    def __repr__(self) -> str:
        return (f"Tokenizer({self.tokenizer_type}, {self.tokenizer_model!r}, "
                f"vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad}, bos={self.bos})")


def build_tokenizer(tokenizer_type: str, tokenizer_model: str,
                    eod_token: str | int | None = None) -> Tokenizer:
    """Load the tokenizer named by Megatron's flags.

    Args:
        tokenizer_type: ``"HuggingFaceTokenizer"`` or ``"SentencePieceTokenizer"``.
        tokenizer_model: HF: a ``tokenizer.json`` file or a directory holding one.
            SentencePiece: a ``.model`` file.
        eod_token: overrides the end-of-document token: a token string, or an id (an int or a
            string of digits, as ``--eod-token 100257`` gives).

    Raises:
        ValueError: unknown type, a file of the other kind, a directory without ``tokenizer.json``,
            an ``eod_token`` not in the vocabulary, or no end-of-text token found.
        FileNotFoundError: ``tokenizer_model`` does not exist.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; "
                         f"choose one of {', '.join(TOKENIZER_TYPES)}")
    if not tokenizer_model:
        raise ValueError("--tokenizer-model is required")
    path = os.path.abspath(os.path.expanduser(str(tokenizer_model)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"--tokenizer-model {path}: no such file or directory")
    if tokenizer_type == "HuggingFaceTokenizer":
        return _build_hf(path, eod_token)
    return _build_sentencepiece(path, eod_token)


def _looks_like_json(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return head.startswith(b"{")


def _resolve_eod_override(eod_token, piece_to_id, vocab_size: int) -> int:
    """An ``--eod-token`` value (token string or id) -> id; ValueError when not in the vocabulary."""
    text = str(eod_token).strip()
    if isinstance(eod_token, int) and not isinstance(eod_token, bool) or text.isdigit():
        token_id = int(text)
    else:
        found = piece_to_id(text)
        if found is None:
            raise ValueError(f"--eod-token {text!r} is not in the tokenizer's vocabulary")
        return found
    if not 0 <= token_id < vocab_size:
        raise ValueError(f"--eod-token {token_id} is not in the tokenizer's vocabulary "
                         f"(ids 0..{vocab_size - 1})")
    return token_id


def _config_token(directory: str, key: str) -> str | None:
    """``key`` (e.g. ``eos_token``) from ``tokenizer_config.json`` or ``special_tokens_map.json``
    in ``directory``; the value may be a string or a dict with ``content``."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg_path = os.path.join(directory, name)
        if not os.path.isfile(cfg_path):
            continue
        try:
            with open(cfg_path, encoding="utf-8") as f:
                value = json.load(f).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


def _build_hf(path: str, eod_token) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    if os.path.isdir(path):
        directory, path = path, os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"--tokenizer-model {directory}: the directory holds no tokenizer.json "
                             "(HuggingFaceTokenizer needs a tokenizer.json file or a directory "
                             "with one)")
    else:
        directory = os.path.dirname(path)
    if path.endswith(".model"):
        raise ValueError(f"--tokenizer-model {path} looks like a SentencePiece model, not a "
                         "tokenizer.json: use --tokenizer-type SentencePieceTokenizer")
    if not _looks_like_json(path):
        raise ValueError(f"--tokenizer-model {path} is not a tokenizer.json file (not JSON); "
                         "--tokenizer-type HuggingFaceTokenizer needs one")
    try:
        backend = HFTokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"--tokenizer-model {path}: not a valid tokenizer.json ({e})") from None
    vocab = backend.get_vocab(with_added_tokens=True)
    vocab_size = max(max(vocab.values(), default=-1) + 1,
                     backend.get_vocab_size(with_added_tokens=True))

    def lookup(token: str | None) -> int | None:
        return None if token is None else backend.token_to_id(token)

    if eod_token is not None:
        eod = _resolve_eod_override(eod_token, lookup, vocab_size)
    else:
        eod = lookup(_config_token(directory, "eos_token"))
        for candidate in EOD_CANDIDATES:
            if eod is None:
                eod = lookup(candidate)
        if eod is None:
            raise ValueError(f"--tokenizer-model {path}: no end-of-text token found (no eos_token in "
                             f"a tokenizer_config.json beside it, none of {list(EOD_CANDIDATES)} in "
                             "the vocabulary); name one with --eod-token")
    pad = lookup(_config_token(directory, "pad_token"))
    for candidate in PAD_CANDIDATES:
        if pad is None:
            pad = lookup(candidate)
    bos = lookup(_config_token(directory, "bos_token"))
    return Tokenizer("HuggingFaceTokenizer", path, backend, vocab_size, eod,
                     -1 if pad is None else pad, bos)


def _build_sentencepiece(path: str, eod_token) -> Tokenizer:
    import sentencepiece as spm

    if os.path.isdir(path):
        raise ValueError(f"--tokenizer-model {path} is a directory; SentencePieceTokenizer needs a "
                         "SentencePiece .model file")
    if path.endswith(".json") or _looks_like_json(path):
        raise ValueError(f"--tokenizer-model {path} looks like a HuggingFace tokenizer.json: use "
                         "--tokenizer-type HuggingFaceTokenizer")
    backend = spm.SentencePieceProcessor()
    try:
        backend.Load(path)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"--tokenizer-model {path}: not a SentencePiece model ({e})") from None
    vocab_size = backend.get_piece_size()

    def lookup(token: str) -> int | None:
        token_id = backend.piece_to_id(token)
        # piece_to_id returns unk_id for unknown pieces; accept it only for the unk piece itself
        if token_id == backend.unk_id() and backend.id_to_piece(token_id) != token:
            return None
        return token_id

    if eod_token is not None:
        eod = _resolve_eod_override(eod_token, lookup, vocab_size)
    else:
        eod = backend.eos_id()
        if eod < 0:
            raise ValueError(f"--tokenizer-model {path}: the SentencePiece model defines no </s> "
                             "(eos_id = -1); name an end-of-document token with --eod-token")
    bos = backend.bos_id()
    return Tokenizer("SentencePieceTokenizer", path, backend, vocab_size, eod,
                     backend.pad_id(), None if bos < 0 else bos)
