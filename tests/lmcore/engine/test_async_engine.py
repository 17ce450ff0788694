"""AsyncEngine: streaming to concurrent asyncio tasks, early exits abort, errors surface."""

from __future__ import annotations

import asyncio

import pytest

from lmcore import AsyncEngine, Engine, SamplingParams, generate
from lmcore.engine import EngineOverloaded
from tests.helpers.models import (
    SHAPES,
    gpt2_vocab_model,
    random_model,
    random_prompts,
)

GREEDY = dict(temperature=0.0, ignore_eos=True)


async def until(predicate, limit: int = 2000):
    """Let the step thread work until ``predicate()`` holds (counts polls, asserts no timing)."""
    for _ in range(limit):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


def test_concurrent_streams_match_offline_generate():
    model = random_model(31)
    prompts = random_prompts(512, [3, 12, 7, 25, 1, 9], seed=2)
    params = [SamplingParams(max_tokens=5 + 3 * i, temperature=0.9 if i % 2 else 0.0, seed=i, ignore_eos=True)
              for i in range(6)]
    expected = [generate(model, [p], sp)[0].token_ids for p, sp in zip(prompts, params)]

    async def main():
        async with AsyncEngine(Engine(model, max_batch_size=4)) as ae:
            async def consume(p, sp):
                outs = [o async for o in ae.stream(p, sp)]
                assert outs[-1].finished and not any(o.finished for o in outs[:-1])
                return [t for o in outs for t in o.new_token_ids]

            return await asyncio.gather(*(consume(p, sp) for p, sp in zip(prompts, params)))

    assert asyncio.run(main()) == expected


# A long context, so a stream is still far from max_tokens when its consumer leaves (even if the step
# thread runs hundreds of steps before the abort lands).
LONG = SHAPES["tiny"] | dict(block_size=2048)


def test_breaking_out_aborts_and_frees_the_slot():
    model = random_model(32, **LONG)

    async def main():
        engine = Engine(model, max_batch_size=1)
        async with AsyncEngine(engine) as ae:
            agen = ae.stream([1, 2, 3], SamplingParams(max_tokens=2000, **GREEDY))
            async for out in agen:
                assert not out.finished
                break
            await agen.aclose()
            await until(lambda: engine.num_unfinished() == 0)
            assert engine.stats()["requests_aborted"] == 1
            # the single slot is free: the next request runs to completion
            c = await ae.generate([4, 5], SamplingParams(max_tokens=4, **GREEDY))
            assert len(c.token_ids) == 4 and c.finish_reason == "length"
            assert engine.stats()["tokens_generated"] < 2000

    asyncio.run(main())


def test_cancelling_the_consumer_task_aborts_the_request():
    model = random_model(33, **LONG)

    async def main():
        engine = Engine(model, max_batch_size=2)
        async with AsyncEngine(engine) as ae:
            got = []

            async def consume():
                async for out in ae.stream([7, 8], SamplingParams(max_tokens=2000, **GREEDY)):
                    got.append(out)

            task = asyncio.create_task(consume())
            await until(lambda: len(got) >= 2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: engine.num_unfinished() == 0)
            assert engine.stats()["requests_aborted"] == 1 and len(got) < 2000

    asyncio.run(main())


def test_errors_reach_the_caller():
    model = random_model(34, **LONG)

    async def main():
        engine = Engine(model, max_batch_size=1, max_waiting=0)
        async with AsyncEngine(engine) as ae:
            busy = ae.stream([2], SamplingParams(max_tokens=2000, **GREEDY))
            await busy.__anext__()  # it holds the only slot
            with pytest.raises(EngineOverloaded):
                async for _ in ae.stream([1], SamplingParams()):
                    pass
            await busy.aclose()
            await until(lambda: engine.num_unfinished() == 0)
            with pytest.raises(ValueError, match="empty"):
                async for _ in ae.stream([], SamplingParams()):
                    pass
            assert engine.num_unfinished() == 0

    asyncio.run(main())


def test_generate_aggregates_text_and_logprobs(tokenizer):
    model = gpt2_vocab_model(seed=2)
    prompt = tokenizer.encode("The quick brown fox")
    p = SamplingParams(max_tokens=12, temperature=0.8, seed=4, logprobs=2, ignore_eos=True)
    ref = generate(model, [prompt], p, tokenizer=tokenizer)[0]

    async def main():
        async with AsyncEngine(Engine(model, tokenizer=tokenizer)) as ae:
            return await ae.generate(prompt, p)

    c = asyncio.run(main())
    assert c.token_ids == ref.token_ids and c.text == ref.text == tokenizer.decode(ref.token_ids)
    assert [lp.token_id for lp in c.logprobs] == c.token_ids and all(len(lp.top) == 2 for lp in c.logprobs)


def test_stop_ends_unfinished_streams_with_an_error():
    model = random_model(35, **LONG)

    async def main():
        ae = AsyncEngine(Engine(model, max_batch_size=1))
        ae.start()
        agen = ae.stream([1], SamplingParams(max_tokens=2000, **GREEDY))
        await agen.__anext__()
        await asyncio.to_thread(ae.stop)
        with pytest.raises(RuntimeError, match="stopped"):
            async for _ in agen:
                pass
        assert not ae.running

    asyncio.run(main())


def test_a_failing_step_fails_its_streams_and_the_engine_keeps_serving():
    model = random_model(36)

    async def main():
        engine = Engine(model, max_batch_size=2)
        real_step = engine.step
        calls = {"n": 0}

        def flaky_step():
            calls["n"] += 1
            if calls["n"] == 3:
                raise MemoryError("simulated out of memory")
            return real_step()

        engine.step = flaky_step
        async with AsyncEngine(engine) as ae:
            with pytest.raises(RuntimeError, match="generation failed.*simulated out of memory"):
                async for _ in ae.stream([1, 2], SamplingParams(max_tokens=50, **GREEDY)):
                    pass
            assert engine.num_unfinished() == 0 and isinstance(ae.error, MemoryError)
            c = await ae.generate([3, 4], SamplingParams(max_tokens=4, **GREEDY))
            assert c.token_ids == generate(model, [[3, 4]], SamplingParams(max_tokens=4, **GREEDY))[0].token_ids

    asyncio.run(main())


def test_a_lagging_consumer_gets_what_queued_up_as_one_merged_output(tokenizer):
    """Outputs produced while the consumer was away come as one StepOutput: ids, text (whole
    characters) and logprobs concatenated, finish from the last; the whole equals generate()."""
    model = gpt2_vocab_model(seed=3)
    prompt = tokenizer.encode("Streams that fall behind")
    p = SamplingParams(max_tokens=24, temperature=0.8, seed=5, logprobs=2, ignore_eos=True)
    ref = generate(model, [prompt], p, tokenizer=tokenizer)[0]

    async def main():
        engine = Engine(model, tokenizer=tokenizer)
        async with AsyncEngine(engine) as ae:
            agen = ae.stream(prompt, p)
            first = await agen.__anext__()
            await until(lambda: not engine.has_unfinished())  # the consumer is away: 23 tokens pile up
            rest = [out async for out in agen]
            return first, rest

    first, rest = asyncio.run(main())
    assert len(first.new_token_ids) >= 1 and not first.finished
    assert len(rest) == 1  # one catch-up, not one output per token
    merged = rest[0]
    assert merged.finished and merged.finish_reason == "length" and merged.completion_tokens == 24
    assert first.new_token_ids + merged.new_token_ids == ref.token_ids
    assert first.text + merged.text == ref.text == tokenizer.decode(ref.token_ids)
    assert [lp.token_id for lp in first.logprobs + merged.logprobs] == ref.token_ids
    assert [lp.logprob for lp in first.logprobs + merged.logprobs] == [lp.logprob for lp in ref.logprobs]


def test_merge_outputs_keeps_the_last_finish_and_whole_text():
    from lmcore.engine import StepOutput
    from lmcore.engine.async_engine import merge_outputs

    a = StepOutput("r", [1], "", False, None, None, 3, 1)  # a partial character: no text yet
    b = StepOutput("r", [2, 3], "é", False, None, None, 3, 3)
    c = StepOutput("r", [4], "!", True, "stop", None, 3, 4)
    m = merge_outputs([a, b, c])
    assert (m.new_token_ids, m.text, m.finished, m.finish_reason, m.logprobs, m.completion_tokens) == \
        ([1, 2, 3, 4], "é!", True, "stop", None, 4)
    assert merge_outputs([a]) is a


def test_adapters_added_to_a_running_engine_batch_with_the_base(tmp_path):
    """``AsyncEngine.add_adapter`` on a serving engine (fast weight layouts already built): base and
    adapter requests in flight together equal ``generate`` on the base and on base + adapter alone."""
    import copy

    import torch

    from lmcore.lora import LoRAConfig, apply_lora, load_adapter_model, save_adapter
    from lmcore.lora.adapter import lora_state_dict

    base = random_model(37)
    for i, targets in enumerate([("attn.c_attn",), ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")]):
        m = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, target_modules=targets))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in lora_state_dict(m).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        save_adapter(m, tmp_path / f"a{i}", base_model="base")
    prompts = random_prompts(512, [5, 9, 3, 7, 4, 6], seed=8)
    which = [None, "a0", "a1", "a1", None, "a0"]
    p = SamplingParams(max_tokens=12, **GREEDY)
    refs = {None: base, **{f"a{i}": load_adapter_model(base, tmp_path / f"a{i}") for i in range(2)}}
    expected = [generate(refs[a], [pr], p)[0].token_ids for pr, a in zip(prompts, which)]
    assert len({tuple(e) for e in expected[:3]}) == 3  # the adapters change the outputs

    async def main():
        engine = Engine(copy.deepcopy(base), max_batch_size=8)
        async with AsyncEngine(engine) as ae:
            await ae.generate(prompts[0], p)  # serving before any adapter exists
            for i in range(2):
                assert await asyncio.to_thread(ae.add_adapter, f"a{i}", tmp_path / f"a{i}") == i
            steps = engine.stats()["steps"]

            async def consume(pr, a):
                return [t async for o in ae.stream(pr, p, adapter=a) for t in o.new_token_ids]

            got = await asyncio.gather(*(consume(pr, a) for pr, a in zip(prompts, which)))
            return got, engine.stats()["steps"] - steps

    got, steps = asyncio.run(main())
    assert got == expected
    assert steps < len(prompts) * 12 / 2  # they shared steps
