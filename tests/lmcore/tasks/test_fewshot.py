"""FewShotPrompt: styles, fitting examples into a token budget, stop suggestions, prefix sharing."""

from __future__ import annotations

import pytest

from lmcore import Engine, FewShotPrompt, SamplingParams
from lmcore.tasks import PromptStyle, RenderedPrompt
from lmcore.tasks.fewshot import STYLES, register_style
from tests.helpers.models import gpt2_vocab_model

EXAMPLES = [("cheese", "fromage"), ("sea otter", "loutre de mer"), ("peppermint", "menthe poivrée"),
            ("plush giraffe", "girafe peluche")]


def test_qa_style_renders_gpt3s_layout(tokenizer):
    fs = FewShotPrompt("Translate English to French.", EXAMPLES[:2], style="qa")
    r = fs.render("  sea lion ", tokenizer, 1000)
    assert r.text == ("Translate English to French.\n\nQ: cheese\nA: fromage\n\n"
                      "Q: sea otter\nA: loutre de mer\n\nQ: sea lion\nA:")
    assert r.token_ids == tokenizer.encode(r.text)
    assert r.examples_used == 2 and isinstance(r, RenderedPrompt)
    assert r.stop == ["\n\n", "\nQ:"]


def test_io_style_and_custom_templates(tokenizer):
    r = FewShotPrompt("", EXAMPLES[:1], style="io").render("dog", tokenizer, 100)
    assert r.text == "Input: cheese\nOutput: fromage\n\nInput: dog\nOutput:"
    assert r.stop == ["\n\n", "\nInput:"]
    arrow = FewShotPrompt("", EXAMPLES[:2], template="arrow").render("dog", tokenizer, 100)
    assert arrow.text == "cheese => fromage\nsea otter => loutre de mer\ndog =>"
    custom = PromptStyle("english", "English: ", "\nFrench:", "\n###\n")
    r = FewShotPrompt("Translate.", EXAMPLES[:1], style=custom).render("dog", tokenizer, 100)
    assert r.text == "Translate.\n###\nEnglish: cheese\nFrench: fromage\n###\nEnglish: dog\nFrench:"
    assert r.stop == ["\n###\n", "\nEnglish:"]
    register_style(PromptStyle("test-registered", "> ", " <"))
    assert "test-registered" in STYLES
    assert FewShotPrompt("", [], style="test-registered").text("x") == "> x <"


def test_unknown_style_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown prompt style 'chat'.*arrow.*io.*plain.*qa"):
        FewShotPrompt("x", EXAMPLES, style="chat")


def test_budget_keeps_as_many_examples_as_fit_in_order(tokenizer):
    fs = FewShotPrompt("Translate English to French.", EXAMPLES)
    sizes = [len(tokenizer.encode(fs.text("sea lion", k))) for k in range(5)]
    assert sizes == sorted(sizes)
    for k in range(5):
        r = fs.render("sea lion", tokenizer, sizes[k])
        assert r.examples_used == k and len(r.token_ids) == sizes[k]
        if k < 4:
            assert fs.render("sea lion", tokenizer, sizes[k + 1] - 1).examples_used == k
    assert "cheese" in fs.render("sea lion", tokenizer, sizes[1]).text  # the first examples are kept


def test_query_that_cannot_fit_is_an_error(tokenizer):
    fs = FewShotPrompt("Translate English to French.", EXAMPLES)
    with pytest.raises(ValueError, match=r"alone are \d+ tokens, more than the prompt budget of 5"):
        fs.render("sea lion", tokenizer, 5)


def test_queries_share_a_prefix_that_the_engine_reuses(tokenizer):
    fs = FewShotPrompt("Translate English to French.", EXAMPLES)
    a = fs.render("sea lion", tokenizer, 1000).token_ids
    b = fs.render("mountain goat", tokenizer, 1000).token_ids
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared >= len(a) - 6  # only the query itself differs ("Q:" and before are shared)
    engine = Engine(gpt2_vocab_model(), tokenizer=tokenizer, prefix_block_size=8)
    for ids in (a, b):
        engine.add_request(ids, SamplingParams(max_tokens=2))
        while engine.has_unfinished():
            engine.step()
    s = engine.stats()
    assert s["prefix_cache_hits"] == 1 and s["prefix_cache_hit_tokens"] == (shared // 8) * 8
