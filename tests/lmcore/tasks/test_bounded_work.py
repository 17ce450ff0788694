"""Bounded work in lmcore's tasks: Score's memory is O(tokens), a few-shot prompt that cannot fit is
refused without tokenizing, a text prompt too long for the context is refused by its length."""

from __future__ import annotations

import pytest
import torch

from lmcore import FewShotPrompt, score
from lmcore.engine import check_prompt_chars
from tests.helpers.models import gpt2_vocab_model, random_prompts


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::"))


def test_score_never_holds_logits_for_every_position():
    model = gpt2_vocab_model(3)  # the real 50,257-entry vocabulary
    vocab = model.config.vocab_size
    context = random_prompts(vocab, [20], seed=1)[0]
    choices = random_prompts(vocab, [100] * 16, seed=2)  # 1,600 positions x 50k x 4 bytes = 322 MB of logits
    got = score(model, context, choices)
    biggest = _largest_allocation(lambda: score(model, context, choices))
    assert biggest < 80 * 2**20, f"largest single allocation {biggest / 2**20:.0f} MiB"
    # The chunked path gives the full computation's numbers.
    with torch.no_grad():
        for cont, s in zip(choices[:3], got[:3]):
            logp = torch.log_softmax(model(torch.tensor([context + cont]))[0].double(), -1)
            ref = [logp[len(context) - 1 + t, tok].item() for t, tok in enumerate(cont)]
            assert s.token_logprobs == pytest.approx(ref, abs=1e-4)
    small = score(model, context, choices[:5], max_batch_tokens=130, chunk_rows=7)
    for a, b in zip(small, got[:5]):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)


def test_a_few_shot_prompt_that_cannot_fit_is_refused_without_tokenizing(tokenizer):
    calls = []

    class Counting:  # the real tokenizer, counting the characters it is asked to encode
        max_token_chars = tokenizer.max_token_chars

        def encode(self, text):
            calls.append(len(text))
            return tokenizer.encode(text)

    huge = "word " * 200_000
    with pytest.raises(ValueError, match="characters"):
        FewShotPrompt(huge, [("a", "b")]).render("q", Counting(), 100)
    assert calls == []
    r = FewShotPrompt("Answer.", [("a", "b"), (huge, "c"), ("d", "e")]).render("q", Counting(), 100)
    assert r.examples_used == 1 and max(calls) < 100 * tokenizer.max_token_chars


def test_check_prompt_chars_is_sound(tokenizer):
    L = tokenizer.max_token_chars
    check_prompt_chars(100 * L, L, 28, 128)  # could be 100 tokens: allowed
    with pytest.raises(ValueError, match="at least 101 tokens"):
        check_prompt_chars(100 * L + 1, L, 28, 128)
    for text in ("a" * 5000, " " * 5000, "👩‍👩‍👧" * 500, "<|endoftext|>" * 300):
        ids = tokenizer.encode(text, allowed_special="all")
        assert len(ids) >= -(-len(text) // L)  # the bound never refuses a text that fits
