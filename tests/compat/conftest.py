"""Fixtures for tests/compat: the compat layer applied, and the tiny megatron-core GPT kit
(tests/gpt_kit.py) used to compare TP/PP/SP layouts against TP1/PP1 runs made in the same
workers (docs/megatron_core_notes.md §3-§4).
"""
from __future__ import annotations

import pytest

from megatron_hybrid.compat import apply_compat
from tests.gpt_kit import GPTKit


@pytest.fixture(scope="session")
def compat():
    """apply_compat() once for the session; returns its status dict."""
    return apply_compat()


@pytest.fixture(scope="session")
def gpt(compat):
    """The GPTKit class (compat applied)."""
    return GPTKit


