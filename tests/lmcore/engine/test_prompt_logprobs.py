"""Prompt log-probabilities (echo + logprobs): from the prefill the request runs anyway, equal to Score's."""

from __future__ import annotations

import pytest
import torch

from lmcore import Engine, SamplingParams
from lmcore.tasks import score
from tests.helpers.models import random_model, random_prompts


def run(engine: Engine, prompts, params_list):
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params_list)]
    first: dict[str, object] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id not in first:
                first[out.request_id] = out
            else:
                assert out.prompt_logprobs is None  # handed out with the first token only
    return [first[r] for r in ids]


@pytest.mark.parametrize("chunk", [7, 256])  # prefill in several chunks, or in one
def test_prompt_logprobs_equal_score_and_the_full_forward(chunk):
    model = random_model(seed=3)
    prompts = random_prompts(model.config.vocab_size, [41, 1, 12], seed=5)
    engine = Engine(model, prefill_chunk_size=chunk, max_batch_size=4)
    params = [SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=3),
              SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0),
              SamplingParams(max_tokens=4, temperature=0.9, seed=1)]  # a neighbour that asks for none
    outs = run(engine, prompts, params)
    assert outs[2].prompt_logprobs is None
    for prompt, out, sp in zip(prompts[:2], outs[:2], params[:2]):
        lps = out.prompt_logprobs
        assert len(lps) == len(prompt) and lps[0] is None
        if len(prompt) == 1:
            continue
        [ref] = score(model, prompt[:1], [prompt[1:]])  # the Score path: a plain forward
        assert [e.token_id for e in lps[1:]] == prompt[1:]
        torch.testing.assert_close(torch.tensor([e.logprob for e in lps[1:]]), torch.tensor(ref.token_logprobs),
                                   atol=1e-4, rtol=0)
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([prompt]))[0].float(), -1)  # (T, V)
        values, top_ids = torch.topk(full[:-1], sp.prompt_logprobs, dim=-1)
        for t, e in enumerate(lps[1:]):
            assert len(e.top) == sp.prompt_logprobs
            assert [i for i, _ in e.top] == top_ids[t].tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in e.top]), values[t], atol=1e-4, rtol=0)


def test_cached_prefix_is_recomputed_for_prompt_logprobs():
    model = random_model(seed=4)
    [prompt] = random_prompts(model.config.vocab_size, [40], seed=1)
    engine = Engine(model, prefix_block_size=8)
    run(engine, [prompt], [SamplingParams(max_tokens=1, temperature=0)])  # warms the prefix cache
    computed = engine.stats()["prompt_tokens_computed"]
    [out] = run(engine, [prompt], [SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)])
    assert engine.stats()["prompt_tokens_computed"] - computed == len(prompt)  # no reuse: every position
    assert len(out.prompt_logprobs) == len(prompt) and all(e is not None for e in out.prompt_logprobs[1:])


def test_prompt_logprobs_bounds():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def test_max_tokens_0_scores_a_prompt_that_fills_the_context():
    """``max_tokens=0`` with prompt_logprobs only scores: nothing is generated, so the prompt may
    take every position of the context (one more token than a generating request may)."""
    model = random_model(seed=5)
    block = model.config.block_size
    [prompt] = random_prompts(model.config.vocab_size, [block], seed=2)
    engine = Engine(model, max_batch_size=2)
    [out] = run(engine, [prompt], [SamplingParams(max_tokens=0, prompt_logprobs=2)])
    assert out.finished and out.finish_reason == "length" and out.new_token_ids == []
    assert out.completion_tokens == 0 and len(out.prompt_logprobs) == block
    with torch.inference_mode():
        full = torch.log_softmax(model(torch.tensor([prompt]))[0].float(), dim=-1)
    got = torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])
    want = full[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert not engine.has_unfinished()
    with pytest.raises(ValueError, match="exceeds the context"):  # generating one token needs one more position
        engine.add_request(prompt, SamplingParams(max_tokens=1, prompt_logprobs=2))
    with pytest.raises(ValueError, match="0 only with prompt_logprobs"):
        SamplingParams(max_tokens=0)
