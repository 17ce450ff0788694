"""bench/vocab.py: the benchmarks find GPT-2's vocabulary, or say so and train one (a fresh clone has none)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import GPT2_TIKTOKEN, ROOT


@pytest.fixture
def vocab_module():
    spec = importlib.util.spec_from_file_location("bench_vocab", ROOT / "bench" / "vocab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpt2_vocabulary_is_used_when_present(vocab_module, monkeypatch):
    if not GPT2_TIKTOKEN.is_file():
        pytest.skip(f"{GPT2_TIKTOKEN} not found")
    monkeypatch.setenv("LMSTACK_GPT2_TIKTOKEN", str(GPT2_TIKTOKEN))
    assert vocab_module.bench_vocabulary() == (GPT2_TIKTOKEN, "gpt2")


def test_a_clone_without_it_trains_one_and_says_where_to_get_it(vocab_module, monkeypatch, tmp_path, capsys):
    from lmcore import Tokenizer

    monkeypatch.delenv("LMSTACK_GPT2_TIKTOKEN", raising=False)
    monkeypatch.setattr(vocab_module, "ROOT", tmp_path / "clone")  # no shared/ above it
    monkeypatch.setattr(vocab_module, "FALLBACK_VOCAB_SIZE", 400)   # small: the real size takes minutes
    monkeypatch.setattr(vocab_module, "FALLBACK_DIR", tmp_path / "fallback")
    path, name = vocab_module.bench_vocabulary()
    assert "gpt2.tiktoken) is not here; see bench/vocab.py" in capsys.readouterr().err
    tok = Tokenizer.from_file(path)
    assert name == "stdlib-bpe-400" and tok.vocab_size <= 400
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(SystemExit, match="no such file"):
        vocab_module.bench_vocabulary(tmp_path / "missing.tiktoken")
