"""The continuous-batching engine: scheduler and prefix index alone, then the Engine end to end."""

from __future__ import annotations

import copy

import pytest
import torch

from lmcore import Engine, SamplingParams, generate
from lmcore.engine import EngineOverloaded, StepOutput
from lmcore.engine.prefix_cache import PrefixCache
from lmcore.engine.scheduler import Scheduler, Sequence
from tests.helpers.models import SHAPES, greedy_without_cache, random_model, random_prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)


# --- the scheduler, without a model ----------------------------------------------------------------
def _seq(rid, n_prompt, max_tokens=4):
    return Sequence(rid, list(range(n_prompt)), max_tokens)


def _fake_step(sched: Scheduler):
    """What the engine does around the model: advance, then 'sample' a token for who is due."""
    out = sched.schedule()
    sched.advance(out)
    due = list(out.decode) + [c.seq for c in out.prefill if c.completes_prompt]
    for s in due:
        s.output_ids.append(0)
        if len(s.output_ids) >= s.max_tokens:
            sched.finish(s)
    return out


def test_scheduler_admits_fifo_into_lowest_slots_and_chunks_prefill():
    sched = Scheduler(max_slots=2, prefill_chunk_size=10)
    for rid, n in (("a", 4), ("b", 15), ("c", 3)):
        sched.add(_seq(rid, n))
    out = sched.schedule()
    assert [(c.seq.request_id, c.start, c.end) for c in out.prefill] == [("a", 0, 4), ("b", 0, 6)]
    assert [s.slot for s in out.admitted] == [0, 1] and sched.num_waiting == 1
    sched.advance(out)
    out = sched.schedule()  # a decodes, b continues its prompt; c waits for a slot
    assert [s.request_id for s in out.decode] == ["a"]
    assert [(c.seq.request_id, c.start, c.end) for c in out.prefill] == [("b", 6, 15)]
    assert out.prefill[0].completes_prompt and not out.admitted


def test_running_streams_decode_every_step_while_a_long_prompt_prefills():
    sched = Scheduler(max_slots=9, prefill_chunk_size=64)
    for i in range(8):
        sched.add(_seq(f"s{i}", 5, max_tokens=100))
    _fake_step(sched)
    sched.add(_seq("long", 1000, max_tokens=2))
    steps = 0
    while sched.get("long").is_prefilling:
        out = _fake_step(sched)
        steps += 1
        assert len(out.decode) == 8  # nobody stalls
        assert out.num_tokens <= 8 + 64
    assert steps == -(-1000 // 64)


def test_finish_and_abort_free_the_slot_for_the_next_step():
    sched = Scheduler(max_slots=1, prefill_chunk_size=100)
    sched.add(_seq("a", 3))
    sched.add(_seq("b", 3))
    out = sched.schedule()
    sched.advance(out)
    assert [s.request_id for s in out.admitted] == ["a"]
    assert sched.abort("a") is not None and sched.abort("a") is None
    out = sched.schedule()
    assert [s.request_id for s in out.admitted] == ["b"] and out.admitted[0].slot == 0
    assert sched.abort("b") and not sched.has_unfinished()


def test_scheduler_uses_the_prefix_matcher_and_rejects_duplicate_ids():
    sched = Scheduler(max_slots=2, prefill_chunk_size=100, prefix_matcher=lambda seq: (16, ["rows"]))
    sched.add(_seq("a", 40))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(_seq("a", 3))
    out = sched.schedule()
    assert (out.prefill[0].start, out.prefill[0].end) == (16, 40)
    assert out.admitted[0].prefix_rows == ["rows"]


# --- the prefix index, without a model --------------------------------------------------------------
def test_prefix_cache_matches_full_block_chains_only():
    pc = PrefixCache(num_blocks=8, block_size=4)
    prompt = list(range(14))
    assert pc.match(prompt) == []
    new = pc.insert(prompt, 14)
    assert [j for j, _ in new] == [0, 1, 2]  # 3 full blocks; the tail of 2 tokens is not cached
    rows = [r for _, r in new]
    assert pc.match(prompt) == rows
    assert pc.match(list(range(12)) + [99, 98]) == rows  # shares 3 blocks, last token left uncached
    assert pc.match(list(range(12))) == rows[:2]  # at least one token must be computed
    assert pc.match([0, 1, 2, 3, 9, 9, 9, 9, 9]) == rows[:1]
    assert pc.match([7] + list(range(1, 14))) == []  # a changed first token changes every block
    assert pc.insert(prompt, 14) == []  # already there
    assert (pc.queries, pc.hits, pc.hit_tokens) == (6, 4, 12 + 12 + 8 + 4)


def test_prefix_cache_evicts_least_recently_used_leaves_first():
    pc = PrefixCache(num_blocks=3, block_size=2)
    shared = [1, 2, 3, 4]
    pc.insert(shared + [5, 6, 0], 6)  # 3 blocks: full
    pc.insert(shared + [7, 8, 0], 6)  # needs 1 block: evicts the oldest leaf [5, 6], keeps the shared root
    assert len(pc) == 3
    assert len(pc.match(shared + [7, 8, 0])) == 3
    assert len(pc.match(shared + [5, 6, 0])) == 2
    pc.clear()
    assert len(pc) == 0 and pc.match(shared + [0]) == []


# --- the engine ---------------------------------------------------------------------------------------
def run_to_end(engine: Engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def mixed_params(i: int) -> SamplingParams:
    """16 different kinds of request: greedy, plain sampling, top-k, top-p, penalties, logprobs."""
    kinds = [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.8, top_k=20),
        dict(temperature=1.2, top_p=0.9),
        dict(temperature=0.9, top_k=50, top_p=0.8, repetition_penalty=1.3),
        dict(temperature=0.0, presence_penalty=0.8, frequency_penalty=0.5),
        dict(temperature=0.7, logprobs=3),
        dict(temperature=1.0, frequency_penalty=1.0),
    ]
    return SamplingParams(max_tokens=6 + (i * 5) % 17, seed=1000 + i, ignore_eos=True, **kinds[i % len(kinds)])


def test_seeded_requests_give_the_same_tokens_alone_or_in_any_batch():
    model = random_model(21)
    prompts = random_prompts(512, [3 + (7 * i) % 40 for i in range(16)], seed=5)
    params = [mixed_params(i) for i in range(16)]
    alone = []
    for p, sp in zip(prompts, params):
        e = Engine(model, max_batch_size=1)
        rid = e.add_request(p, sp)
        alone.append(run_to_end(e)[rid])
    # All 16 at once ...
    e = Engine(model, max_batch_size=16)
    ids = [e.add_request(p, sp) for p, sp in zip(prompts, params)]
    together = run_to_end(e)
    assert [together[i] for i in ids] == alone
    # ... and staggered, in reverse order, through fewer slots and small prefill chunks.
    e = Engine(model, max_batch_size=5, prefill_chunk_size=8)
    order = list(reversed(range(16)))
    ids = {}
    got: dict[str, list[int]] = {}
    while order or e.has_unfinished():
        if order:
            i = order.pop(0)
            ids[i] = e.add_request(prompts[i], params[i])
        for out in e.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert [got[ids[i]] for i in range(16)] == alone
    assert [len(t) for t in alone] == [sp.max_tokens for sp in params]


def test_batched_greedy_equals_no_cache_decoding():
    model = random_model(8, **SHAPES["narrow-heads"])
    prompts = random_prompts(301, [2, 9, 31, 5, 17], seed=8)
    out = generate(model, prompts, SamplingParams(max_tokens=15, **GREEDY), max_batch_size=3,
                   prefill_chunk_size=6)
    for p, c in zip(prompts, out):
        assert c.token_ids == greedy_without_cache(model, p, 15)


def test_a_long_prompt_does_not_stall_running_streams():
    model = random_model(4, **(SHAPES["tiny"] | dict(block_size=1100)))
    engine = Engine(model, max_batch_size=9, prefill_chunk_size=128, enable_prefix_cache=False)
    streams = [engine.add_request(p, SamplingParams(max_tokens=60, **GREEDY))
               for p in random_prompts(512, [5] * 8, seed=1)]
    engine.step()  # the 8 prompts prefill together and each samples its first token
    long_id = engine.add_request(random_prompts(512, [1000], seed=2)[0], SamplingParams(max_tokens=3, **GREEDY))
    steps = 0
    while True:
        outs = {o.request_id: o for o in engine.step()}
        steps += 1
        assert all(len(outs[s].new_token_ids) == 1 for s in streams), f"a stream stalled at step {steps}"
        if long_id in outs:
            break
    assert steps == -(-1000 // 128)  # the long prompt took exactly its chunks, never more


def test_prefix_cache_on_and_off_give_identical_outputs_and_count_hits():
    model = random_model(6)
    shared = random_prompts(512, [50], seed=3)[0]  # an "instruction + examples" prefix
    prompts = [shared + q for q in random_prompts(512, [3, 8, 1, 12, 5, 20], seed=4)]
    params = [SamplingParams(max_tokens=10, temperature=t, seed=i, ignore_eos=True)
              for i, t in enumerate([0.0, 0.9, 0.0, 1.1, 0.0, 0.7])]

    def run(enable: bool, wave: int):
        e = Engine(model, max_batch_size=4, prefill_chunk_size=16, enable_prefix_cache=enable)
        ids = [e.add_request(p, sp) for p, sp in zip(prompts[:wave], params[:wave])]
        first = run_to_end(e)
        ids2 = [e.add_request(p, sp) for p, sp in zip(prompts[wave:], params[wave:])]
        second = run_to_end(e)
        return [first[i] for i in ids] + [second[i] for i in ids2], e.stats()

    off, off_stats = run(False, 1)
    on, on_stats = run(True, 1)
    assert on == off
    assert off_stats["prefix_cache_hits"] == 0
    assert on_stats["prefix_cache_hits"] == 5  # every request after the first reused the prefix
    assert on_stats["prefix_cache_hit_tokens"] == 5 * 48  # 3 full blocks of 16 of the 50 shared tokens
    assert on_stats["prompt_tokens_computed"] == off_stats["prompt_tokens_computed"] - 5 * 48


def test_abort_frees_the_slot_before_the_next_step():
    model = random_model()
    e = Engine(model, max_batch_size=2)
    a = e.add_request([1, 2, 3], SamplingParams(max_tokens=50, **GREEDY))
    b = e.add_request([4, 5], SamplingParams(max_tokens=50, **GREEDY))
    c = e.add_request([6], SamplingParams(max_tokens=2, **GREEDY))
    e.step()
    assert e.stats()["running"] == 2 and e.stats()["waiting"] == 1
    assert e.abort(a) and not e.abort(a) and not e.abort("nope")
    outs = {o.request_id: o for o in e.step()}
    assert set(outs) == {b, c}  # c took a's slot at once; a produced nothing more
    assert e.num_unfinished() == 2 and e.stats()["requests_aborted"] == 1
    assert e.abort(b)
    rest = run_to_end(e)
    assert set(rest) == {c} and len(rest[c]) == 1  # c finishes (2 tokens); nothing else runs
    assert not e.has_unfinished()


def test_aborting_a_waiting_request():
    e = Engine(random_model(), max_batch_size=1)
    a = e.add_request([1], SamplingParams(max_tokens=3))
    b = e.add_request([2], SamplingParams(max_tokens=3))
    assert e.abort(b)
    assert set(run_to_end(e)) == {a}


def test_full_waiting_queue_raises_engine_overloaded():
    e = Engine(random_model(), max_batch_size=2, max_waiting=2)
    for i in range(4):  # 2 take the free slots, 2 wait
        e.add_request([1 + i], SamplingParams(max_tokens=5))
    with pytest.raises(EngineOverloaded, match=r"all 2 slots.*2 waiting") as err:
        e.add_request([9], SamplingParams())
    assert isinstance(err.value, RuntimeError)
    e.step()  # two admitted: two places left in the queue
    assert e.stats()["running"] == 2 and e.stats()["waiting"] == 2
    with pytest.raises(EngineOverloaded):
        e.add_request([9], SamplingParams())
    assert e.abort(e.scheduler.running[0].request_id)  # a slot frees: room for one more
    e.add_request([9], SamplingParams())
    with pytest.raises(EngineOverloaded):
        e.add_request([10], SamplingParams())


def test_step_outputs_carry_counts_and_finish_reasons():
    e = Engine(random_model())
    rid = e.add_request([1, 2, 3, 4], SamplingParams(max_tokens=3, **GREEDY), request_id="mine")
    assert rid == "mine"
    outs = [o for _ in range(3) for o in e.step()]
    assert all(isinstance(o, StepOutput) for o in outs)
    assert [o.completion_tokens for o in outs] == [1, 2, 3]
    assert {o.prompt_tokens for o in outs} == {4}
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].finish_reason == "length" and outs[0].finish_reason is None
    assert all(o.text == "" and o.logprobs is None for o in outs)
    assert e.step() == [] and not e.has_unfinished()
    s = e.stats()
    assert s["tokens_generated"] == 3 and s["requests_finished"] == 1 and s["running"] == 0


def test_request_errors_are_clear():
    e = Engine(random_model(), max_seq_len=64)
    with pytest.raises(ValueError, match=r"60 tokens.*max_tokens 8.*68.*64"):
        e.add_request([1] * 60, SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="empty"):
        e.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="integer token ids"):
        e.add_request([1, 2.5], SamplingParams())
    e.add_request(torch.tensor([1, 2]).tolist() + [torch.tensor(3)], SamplingParams())  # tensor ints are fine
    e.add_request([1], SamplingParams(), request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        e.add_request([1], SamplingParams(), request_id="x")


def test_engine_leaves_the_state_dict_alone_and_serves_lora_models():
    from lmcore.lora import LoRAConfig, apply_lora, merge_lora

    model = random_model(9)
    keys = list(model.state_dict())
    prompts = random_prompts(512, [7, 3], seed=9)
    Engine(model)
    assert list(model.state_dict()) == keys
    apply_lora(model, LoRAConfig(rank=4, target_modules=("all",)))
    with torch.no_grad():  # a non-zero adapter, so it changes the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    wrapped = generate(model, prompts, SamplingParams(max_tokens=8, **GREEDY))
    assert [c.token_ids for c in wrapped] == [greedy_without_cache(model, p, 8) for p in prompts]
    assert [c.token_ids for c in wrapped] != [greedy_without_cache(random_model(9), p, 8) for p in prompts]
    merge_lora(model)
    merged = generate(model, prompts, SamplingParams(max_tokens=8, **GREEDY))
    assert [c.token_ids for c in merged] == [c.token_ids for c in wrapped]


def test_engine_rebuild_sees_new_weights():
    model = random_model(10)
    before = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=6, **GREEDY))[0].token_ids
    with torch.no_grad():
        model.transformer.wte.weight.mul_(-1.0)  # the tied head changes too
    after = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=6, **GREEDY))[0].token_ids
    assert after == greedy_without_cache(model, [1, 2, 3], 6) and after != before


@pytest.mark.cuda
def test_cuda_matches_cpu(cuda_available):
    if not cuda_available:
        pytest.skip("no CUDA GPU")
    model = random_model(11)
    prompts = random_prompts(512, [5, 20, 9], seed=11)
    p = SamplingParams(max_tokens=12, **GREEDY)
    cpu = [c.token_ids for c in generate(model, prompts, p)]
    gpu = [c.token_ids for c in generate(model, prompts, p, device="cuda")]
    assert gpu == cpu
    e = Engine(model, device="cuda", dtype=torch.bfloat16)
    rid = e.add_request(prompts[0], SamplingParams(max_tokens=5, temperature=0.8, seed=1, logprobs=2))
    out = run_to_end(e)[rid]
    assert len(out) == 5


def test_single_token_requests_and_mixed_logprobs_in_one_batch():
    model = random_model(12)
    e = Engine(model, max_batch_size=4)
    one = e.add_request([1, 2, 3], SamplingParams(max_tokens=1, **GREEDY))
    lp = e.add_request([4, 5], SamplingParams(max_tokens=3, logprobs=4, **GREEDY))
    plain = e.add_request([6], SamplingParams(max_tokens=3, **GREEDY))
    first = {o.request_id: o for o in e.step()}
    assert first[one].finished and first[one].finish_reason == "length" and e.stats()["running"] == 2
    assert len(first[lp].logprobs) == 1 and len(first[lp].logprobs[0].top) == 4
    assert first[plain].logprobs is None
    assert first[lp].logprobs[0].top[0][0] == first[lp].new_token_ids[0]  # greedy picks the top-1
    run_to_end(e)
    assert e.stats()["requests_finished"] == 3


def test_decoding_around_a_freed_slot_matches_no_cache_decoding():
    model = random_model(13)
    e = Engine(model, max_batch_size=3, enable_prefix_cache=False)
    prompts = random_prompts(512, [4, 6, 9], seed=13)
    ids = [e.add_request(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(prompts, [20, 3, 20])]
    got: dict[str, list[int]] = {}
    saw_hole = False
    while e.has_unfinished():
        for o in e.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        saw_hole |= sorted(s.slot for s in e.scheduler.running) == [0, 2]
    assert saw_hole  # slot 1 freed while 0 and 2 decode: the batch ran with a hole
    for rid, p, n in zip(ids, prompts, [20, 3, 20]):
        assert got[rid] == greedy_without_cache(model, p, n)


def test_tiny_prefix_pool_evicts_and_stays_correct():
    model = random_model(14)
    shared = random_prompts(512, [40], seed=14)[0]
    prompts = [shared + q for q in random_prompts(512, [5, 9, 2, 7], seed=15)] + random_prompts(512, [37], seed=16)
    p = SamplingParams(max_tokens=6, **GREEDY)
    e = Engine(model, max_batch_size=2, prefix_cache_tokens=32, prefix_block_size=8)  # 4 blocks
    out = []
    for prompt in prompts:
        rid = e.add_request(prompt, p)
        out.append(run_to_end(e)[rid])
    assert out == [greedy_without_cache(model, q, 6) for q in prompts]
    s = e.stats()
    assert s["prefix_cache_blocks_used"] <= s["prefix_cache_blocks_total"] == 4 and s["prefix_cache_hits"] >= 3


def _lora_variant(base, seed):
    from lmcore.lora import LoRAConfig, apply_lora

    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(rank=4, target_modules=("all",)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    return model


def test_one_batch_serves_several_lora_adapters(tmp_path):
    from lmcore.lora import save_adapter

    base = random_model(50)
    variants = {name: _lora_variant(base, i) for i, name in enumerate(["sql", "poem"])}
    e = Engine(copy.deepcopy(base), max_batch_size=4, prefill_chunk_size=16)
    for i, (name, m) in enumerate(variants.items()):
        save_adapter(m, tmp_path / name, base_model="base")
        assert e.add_adapter(name, tmp_path / name) == i
    assert e.add_adapter("sql", tmp_path / "sql") == 0 and e.adapters() == ["sql", "poem"]
    shared = random_prompts(512, [35], seed=50)[0]  # a shared prefix: cached per adapter, never across
    prompts = [shared + q for q in random_prompts(512, [3, 5, 4, 6, 2, 7], seed=51)]
    which = [None, "sql", "poem", "sql", None, 1]  # 1 is "poem" by index
    refs = {None: base, "sql": variants["sql"], "poem": variants["poem"], 1: variants["poem"]}
    ids = [e.add_request(p, SamplingParams(max_tokens=8, **GREEDY), adapter=a) for p, a in zip(prompts, which)]
    got = run_to_end(e)
    expected = [greedy_without_cache(refs[a], p, 8) for p, a in zip(prompts, which)]
    assert [got[i] for i in ids] == expected
    assert len({tuple(x) for x in expected[:3]}) == 3  # the adapters really change the outputs
    with pytest.raises(ValueError, match="unknown adapter 'chat'.*sql.*poem"):
        e.add_request([1], SamplingParams(), adapter="chat")
    with pytest.raises(ValueError, match="no LoRA bank"):
        Engine(base).add_request([1], SamplingParams(), adapter="sql")


def test_adapters_are_counted_loaded_and_removed_between_steps(tmp_path):
    """The questions a service asks the engine: adapter parameter counts (from the loaded tensors),
    per-adapter load, and removal, refused while a request uses the adapter."""
    from lmcore.lora import save_adapter

    base = random_model(51)
    variant = _lora_variant(base, 0)
    save_adapter(variant, tmp_path / "a", base_model="base")
    e = Engine(copy.deepcopy(base), max_batch_size=2)
    assert e.adapters() == [] and e.load() == (0, 0)
    e.add_adapter("a", tmp_path / "a")
    cfg = base.config
    per_block = 4 * ((cfg.n_embd + 3 * cfg.n_embd) + (cfg.n_embd + cfg.n_embd) + (cfg.n_embd + 4 * cfg.n_embd)
                     + (4 * cfg.n_embd + cfg.n_embd))  # rank 4: A (r, in) + B (out, r) of each projection
    assert e.adapter_parameters("a") == cfg.n_layer * per_block
    for a in ("a", None, "a"):
        e.add_request([1, 2, 3], SamplingParams(max_tokens=4, **GREEDY), adapter=a)
    assert e.load() == (0, 3) and e.load("a") == (0, 2)
    e.step()
    assert e.load() == (2, 1) and e.load("a") == (1, 1)
    with pytest.raises(ValueError, match="still in use"):
        e.remove_adapter("a")
    run_to_end(e)
    assert e.load("a") == (0, 0)
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        with e.use_adapter("a"):  # this thread's plain forward goes through the adapter
            torch.testing.assert_close(e.model(idx), variant(idx), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(e.model(idx), variant(idx))  # and only inside the block
    e.remove_adapter("a")
    assert e.adapters() == []
    with pytest.raises(ValueError, match="unknown adapter 'a'"):
        e.add_request([1], SamplingParams(), adapter="a")
    with torch.no_grad(), e.use_adapter(None):
        torch.testing.assert_close(e.model(idx), base(idx))
    rid = e.add_request([1, 2], SamplingParams(max_tokens=3, **GREEDY))  # the base still serves
    assert run_to_end(e)[rid] == greedy_without_cache(base, [1, 2], 3)


def test_a_failed_step_can_abort_everything():
    e = Engine(random_model(), max_batch_size=1)
    ids = [e.add_request([i + 1], SamplingParams(max_tokens=5)) for i in range(3)]
    e.step()
    assert sorted(e.abort_all()) == sorted(ids) and not e.has_unfinished() and e.abort_all() == []
    assert e.stats()["requests_aborted"] == 3


def test_sampled_tokens_follow_the_model_distribution():
    """2,000 seeded one-token requests: the frequencies of the likeliest tokens (and of all the rest
    together) match softmax(logits / T) of the model's plain forward within 4.5 standard errors,
    and top-k never leaves the k most likely tokens."""
    model = random_model(60)
    prompt = [5, 17, 42]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1].double()
    n = 2000

    def frequencies(**kw):
        e = Engine(model, max_batch_size=64, max_waiting=n)
        for i in range(n):
            e.add_request(prompt, SamplingParams(max_tokens=1, seed=i, **kw))
        counts = torch.zeros(model.config.vocab_size, dtype=torch.float64)
        for toks in run_to_end(e).values():
            counts[toks[0]] += 1
        return counts / n

    def assert_matches(freq, p):
        top = p.topk(8).indices
        f = torch.cat([freq[top], 1 - freq[top].sum(0, keepdim=True)])
        q = torch.cat([p[top], 1 - p[top].sum(0, keepdim=True)])
        z = (f - q) / (q * (1 - q) / n).clamp_min(1e-12).sqrt()
        assert z.abs().max() < 4.5, (f.tolist(), q.tolist())

    for t in (0.7, 1.5):
        assert_matches(frequencies(temperature=t), torch.softmax(logits / t, -1))
    freq = frequencies(temperature=1.0, top_k=5)
    top5 = logits.topk(5).indices
    assert set(freq.nonzero().flatten().tolist()) <= set(top5.tolist())
    p5 = torch.zeros_like(logits)
    p5[top5] = torch.softmax(logits[top5], -1)
    assert_matches(freq, p5)
    probs = torch.softmax(logits, -1)
    order = probs.argsort(descending=True)
    keep = order[: int((probs[order].cumsum(0) < 0.8).sum()) + 1]  # the smallest set reaching 0.8
    freq = frequencies(temperature=1.0, top_p=0.8)
    assert set(freq.nonzero().flatten().tolist()) <= set(keep.tolist())
    pp = torch.zeros_like(probs)
    pp[keep] = probs[keep] / probs[keep].sum()
    assert_matches(freq, pp)
