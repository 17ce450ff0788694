"""No request can hurt another: bounded sampling parameters, a sampler robust to non-finite logits,
and a step that fails because of one request failing that request alone."""

from __future__ import annotations

import asyncio
import math

import pydantic
import pytest
import torch

from lmcore import AsyncEngine, Engine, SamplingParams, generate
from lmcore.engine.sampling import MAX_STOP_LENGTH, logits_to_probs, sample_from_probs
from tests.helpers.models import random_model

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("field,value", [
    ("temperature", 1e-38), ("temperature", 1e9), ("temperature", math.nan), ("temperature", math.inf),
    ("repetition_penalty", 1e-38), ("repetition_penalty", 1e38), ("top_p", math.nan),
    ("presence_penalty", -math.inf), ("frequency_penalty", math.nan),
])
def test_sampling_parameters_that_would_overflow_the_logits_are_refused(field, value):
    with pytest.raises(pydantic.ValidationError, match=field):
        SamplingParams(**{field: value})


def test_stop_strings_are_bounded_in_length_and_a_template_may_add_its_own():
    with pytest.raises(pydantic.ValidationError, match=f"at most {MAX_STOP_LENGTH} characters"):
        SamplingParams(stop=["x" * (MAX_STOP_LENGTH + 1)])
    eight = SamplingParams(stop=[f"s{i}" for i in range(8)])
    assert eight.with_extra_stop(["\n\n", "\nQ:"]).stop[-2:] == ["\n\n", "\nQ:"]


def test_a_row_without_a_usable_distribution_gets_minus_one_and_no_other_row_changes():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    u = torch.tensor([0.3, 0.6, 0.9, 0.1])
    alone = sample_from_probs(logits_to_probs(logits, torch.ones(4)), u)
    broken = logits.clone()
    broken[1] = float("nan")
    broken[2] = float("inf")
    broken[3, :] = -float("inf")
    got = sample_from_probs(logits_to_probs(broken, torch.ones(4)), u)
    assert got.tolist() == [alone[0].item(), -1, -1, -1]


def _bad_params(**kw):
    """Parameters past the bounds, built without validation (as a bug or an older client could)."""
    return SamplingParams.model_construct(**{**SamplingParams().model_dump(), **kw})


def _run(engine: Engine, requests: dict) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(prompt, params, request_id=rid)
    got = {rid: [] for rid in requests}
    errors = {}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            if out.error is not None:
                errors[out.request_id] = out.error
                assert out.finished and out.finish_reason == "error"
    return got, errors


OTHERS = {
    "a": ([1, 2, 3], SamplingParams(max_tokens=24, **GREEDY)),
    "b": ([4, 5], SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True)),
    "c": ([9, 8, 7, 6], SamplingParams(max_tokens=24, top_k=5, temperature=1.2, seed=11, ignore_eos=True)),
}


def test_a_request_whose_sampling_breaks_its_logits_fails_alone():
    model = random_model(41)
    reference, _ = _run(Engine(model, max_batch_size=4), OTHERS)
    bad = {"bad": ([1, 1], _bad_params(temperature=1e-38, max_tokens=24))}
    got, errors = _run(Engine(model, max_batch_size=4), {**OTHERS, **bad})
    assert set(errors) == {"bad"} and isinstance(errors["bad"], ValueError)
    assert "non-finite" in str(errors["bad"])
    assert {rid: got[rid] for rid in OTHERS} == reference  # the others' tokens are unchanged


def test_a_step_that_raises_for_one_request_fails_it_alone_and_replays_the_others_draws():
    model = random_model(42)
    reference, _ = _run(Engine(model, max_batch_size=4), OTHERS)
    poison = 13  # a prompt token only the poisoned request has
    real_forward = model.forward_cached

    def forward_cached(tokens, *args, **kw):
        if (tokens == poison).any():
            raise RuntimeError("simulated kernel failure")
        return real_forward(tokens, *args, **kw)

    model.forward_cached = forward_cached
    engine = Engine(model, max_batch_size=4)
    for rid, (prompt, params) in OTHERS.items():
        engine.add_request(prompt, params, request_id=rid)
    got = {rid: [] for rid in OTHERS}
    for _ in range(3):  # the others are decoding when the poisoned request joins their batch
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    engine.add_request([poison, poison], SamplingParams(max_tokens=4), request_id="poisoned")
    errors = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                errors[out.request_id] = out.error
            else:
                got[out.request_id] += out.new_token_ids
    assert list(errors) == ["poisoned"] and "simulated kernel failure" in str(errors["poisoned"])
    assert got == reference
    assert engine.stats()["requests_failed"] == 1


def test_async_streams_beside_a_failing_request_complete_with_their_tokens():
    model = random_model(43)
    params = SamplingParams(max_tokens=40, **GREEDY)
    want = generate(model, [[1, 2], [3, 4], [5, 6]], params)

    async def main():
        async with AsyncEngine(Engine(model, max_batch_size=4)) as ae:
            async def collect(prompt):
                return [t async for out in ae.stream(prompt, params) for t in out.new_token_ids]

            async def bad():
                with pytest.raises(ValueError, match="non-finite"):
                    async for _ in ae.stream([7, 7], _bad_params(repetition_penalty=1e-38, max_tokens=40)):
                        pass

            results = await asyncio.gather(collect([1, 2]), bad(), collect([3, 4]), collect([5, 6]))
            assert [results[0], results[2], results[3]] == [c.token_ids for c in want]
            assert ae.error is None  # no step failed as a whole

    asyncio.run(main())
