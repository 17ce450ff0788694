"""Fixtures for the lmcore tests."""

from __future__ import annotations

import pytest

from tests.helpers import gpt2_tokenizer


@pytest.fixture
def tokenizer(gpt2_tiktoken_path):
    """The real GPT-2 tokenizer, from this test's private copy of the rank file."""
    return gpt2_tokenizer(gpt2_tiktoken_path)
