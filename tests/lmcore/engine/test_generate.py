"""generate(): KV-cache decoding against transformers and against decoding without a cache."""

from __future__ import annotations

import pytest
import torch

from lmcore import Completion, SamplingParams, generate
from tests.helpers.models import (
    SHAPES,
    gpt2_vocab_model,
    greedy_without_cache,
    hf_greedy,
    random_model,
    random_prompts,
    to_transformers,
)

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_matches_transformers_and_no_cache_decoding(tmp_path, shape):
    model = random_model(seed=list(SHAPES).index(shape) + 10, **SHAPES[shape])
    hf = to_transformers(model, tmp_path)
    prompts = random_prompts(model.config.vocab_size, [1, 5, 17, 30], seed=1)
    n = 24
    ours = generate(model, prompts, SamplingParams(max_tokens=n, **GREEDY))
    for prompt, c in zip(prompts, ours):
        ref = hf_greedy(hf, prompt, n)
        assert c.token_ids == ref, f"prompt of {len(prompt)} tokens"
        assert c.token_ids == greedy_without_cache(model, prompt, n)
        assert c.finish_reason == "length"


def test_chunked_prefill_gives_the_same_tokens():
    model = random_model(3)
    prompts = random_prompts(512, [40, 3, 77], seed=2)
    p = SamplingParams(max_tokens=12, **GREEDY)
    whole = generate(model, prompts, p)
    for chunk in (1, 7, 16):
        assert [c.token_ids for c in generate(model, prompts, p, prefill_chunk_size=chunk)] == \
               [c.token_ids for c in whole]


def test_logprobs_match_transformers_logits(tmp_path):
    model = random_model(5)
    hf = to_transformers(model, tmp_path)
    prompt = random_prompts(512, [9], seed=4)[0]
    c = generate(model, [prompt], SamplingParams(max_tokens=6, logprobs=3, temperature=0.7, seed=1))[0]
    seq = torch.tensor([prompt + c.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(hf(seq).logits[0].double(), -1)  # (T, V)
    assert len(c.logprobs) == 6
    for t, lp in enumerate(c.logprobs):
        row = ref[len(prompt) - 1 + t]
        assert lp.token_id == c.token_ids[t]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        top = row.topk(3)
        assert [i for i, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_no_logprobs_when_off():
    c = generate(random_model(), [[1, 2]], SamplingParams(max_tokens=3))[0]
    assert c.logprobs is None and c.text is None and isinstance(c, Completion)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = random_model(7)
    prompts = random_prompts(512, [4, 11], seed=3)
    p = SamplingParams(max_tokens=20, temperature=1.0, top_k=40, top_p=0.95, seed=1234)
    a = [c.token_ids for c in generate(model, prompts, p)]
    b = [c.token_ids for c in generate(model, prompts, p)]
    c = [c.token_ids for c in generate(model, prompts, p.model_copy(update={"seed": 99}))]
    assert a == b
    assert a != c


def test_eos_stops_and_is_reported():
    model = random_model(2)
    prompt = [5, 6, 7]
    free = generate(model, [prompt], SamplingParams(max_tokens=10, **GREEDY))[0].token_ids
    eos = free[4]
    first = free.index(eos)
    c = generate(model, [prompt], SamplingParams(max_tokens=10, temperature=0.0), eos_id=eos)[0]
    assert c.finish_reason == "eos"
    assert c.token_ids == free[: first + 1]  # the end-of-text token itself is returned, as transformers does
    ignored = generate(model, [prompt], SamplingParams(max_tokens=10, **GREEDY), eos_id=eos)[0]
    assert ignored.token_ids == free and ignored.finish_reason == "length"


def test_context_overflow_is_an_error_naming_both_numbers():
    model = random_model()  # context 128
    with pytest.raises(ValueError, match=r"120 tokens.*max_tokens 20.*140.*128"):
        generate(model, [[1] * 120], SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match=r"200 tokens.*128"):
        generate(model, [[1] * 200], SamplingParams(max_tokens=1))
    c = generate(model, [[1] * 120], SamplingParams(max_tokens=8, **GREEDY))[0]  # exactly fits
    assert len(c.token_ids) == 8


def test_bad_prompts_are_errors():
    model = random_model()
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 512]], SamplingParams())
    with pytest.raises(ValueError, match="list of token-id lists"):
        generate(model, [1, 2, 3], SamplingParams())
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(model, [[1]], SamplingParams(stop=["x"]))


def test_text_matches_decoded_tokens(tokenizer):
    model = gpt2_vocab_model()
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("Once upon a time")]
    out = generate(model, prompts, SamplingParams(max_tokens=30, temperature=1.0, seed=3, ignore_eos=True),
                   tokenizer=tokenizer)
    for c in out:
        assert c.text == tokenizer.decode(c.token_ids)
        assert c.finish_reason == "length"


def test_stop_string_across_tokens_is_excluded(tokenizer):
    model = gpt2_vocab_model(seed=1)
    prompt = tokenizer.encode("Hello there, how are")
    p = SamplingParams(max_tokens=40, temperature=1.0, seed=11, ignore_eos=True)
    free = generate(model, [prompt], p, tokenizer=tokenizer)[0]
    # A stop string that spans a token boundary: the last 2 chars of token 3's text + first 2 of token 4's.
    pieces = [tokenizer.decode([t]) for t in free.token_ids]
    boundary = len("".join(pieces[:4]))
    stop = free.text[boundary - 2: boundary + 2]
    assert len(stop) == 4 and free.text.find(stop) == boundary - 2
    c = generate(model, [prompt], p.model_copy(update={"stop": ["zzzz-never", stop]}), tokenizer=tokenizer)[0]
    assert c.finish_reason == "stop"
    assert c.text == free.text[: boundary - 2]
    assert c.token_ids == free.token_ids[:5]  # generation stopped at the token that completed the stop


def test_greedy_equals_transformers_on_gpt2_vocab_with_text(tmp_path, tokenizer):
    model = gpt2_vocab_model(seed=4)
    hf = to_transformers(model, tmp_path)
    prompt = tokenizer.encode("In a hole in the ground there lived")
    c = generate(model, [prompt], SamplingParams(max_tokens=16, **GREEDY), tokenizer=tokenizer)[0]
    ref = hf_greedy(hf, prompt, 16)
    assert c.token_ids == ref
    assert c.text == tokenizer.decode(ref)


def test_one_sampling_params_per_prompt():
    model = random_model(15)
    prompts = random_prompts(512, [4, 9], seed=15)
    ps = [SamplingParams(max_tokens=3, **GREEDY), SamplingParams(max_tokens=7, temperature=0.8, seed=2)]
    out = generate(model, prompts, ps)
    assert [len(c.token_ids) for c in out] == [3, 7]
    assert out[0].token_ids == greedy_without_cache(model, prompts[0], 3)
    assert out[1].token_ids == generate(model, [prompts[1]], ps[1])[0].token_ids
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        generate(model, prompts, [ps[0]])
