"""Helpers every test area shares (the fixtures themselves live in ``tests/conftest.py``).

``tests.helpers`` (this module): paths, the real GPT-2 vocabulary, free ports, the tokenizer;
``tests.helpers.models``: random models, their transformers twins, reference decoders, tiny
checkpoints on disk; ``tests.helpers.servers``: real gRPC servers in a background thread.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _find_gpt2_tiktoken() -> Path:
    """The real GPT-2 rank file: $LMSTACK_GPT2_TIKTOKEN, else ``shared/fixtures/`` beside the checkout
    or beside any folder above it (a CI clone may sit deeper than the working copy)."""
    if os.environ.get("LMSTACK_GPT2_TIKTOKEN"):
        return Path(os.environ["LMSTACK_GPT2_TIKTOKEN"])
    candidates = [d / "shared" / "fixtures" / "gpt2.tiktoken" for d in ROOT.parents]
    candidates.append(Path("/work/shared/fixtures/gpt2.tiktoken"))
    return next((c for c in candidates if c.is_file()), candidates[0])


GPT2_TIKTOKEN = _find_gpt2_tiktoken()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpt2_tokenizer(path: str | Path | None = None):
    """The real GPT-2 tokenizer, from ``path`` (a private copy) or the shared rank file."""
    from lmcore import Tokenizer

    path = Path(path) if path is not None else GPT2_TIKTOKEN
    if not path.is_file():
        pytest.skip(f"{path} not found (the GPT-2 vocabulary: set LMSTACK_GPT2_TIKTOKEN)")
    return Tokenizer.from_file(path)
