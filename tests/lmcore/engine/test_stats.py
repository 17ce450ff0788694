"""The engine's stats hooks: one StepStats per step, one RequestStats per request, occupancy in stats()."""

from __future__ import annotations

from lmcore import Engine, SamplingParams
from lmcore.engine import EngineConfig
from lmcore.engine.stats import FINISH_REASONS
from tests.helpers.models import random_model, random_prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)


class Recorder:
    def __init__(self):
        self.steps, self.requests = [], []

    def on_step(self, stats):
        self.steps.append(stats)

    def on_request_finished(self, stats):
        self.requests.append(stats)


def engine(**kw) -> tuple[Engine, Recorder]:
    e = Engine(random_model(0), EngineConfig(max_batch_size=2, prefill_chunk_size=8, **kw))
    rec = Recorder()
    e.set_stats_listener(rec)
    return e, rec


def test_every_step_is_reported_with_its_batch_and_tokens():
    e, rec = engine()
    prompts = random_prompts(e.model.config.vocab_size, [5, 12, 3])
    for p in prompts:
        e.add_request(p, SamplingParams(max_tokens=3, **GREEDY))
    plans = 0
    while e.has_unfinished():
        e.step()
        plans += 1
    assert len(rec.steps) == plans == e.stats()["steps"]
    assert all(1 <= s.batch_size <= 2 and s.duration_s >= 0 for s in rec.steps)
    assert sum(s.prefill_tokens for s in rec.steps) == sum(map(len, prompts)) == e.stats()["prompt_tokens_computed"]
    # every generated token but each request's first (sampled at the end of its prefill) is a decode token
    assert sum(s.decode_tokens for s in rec.steps) == 3 * 3 - 3
    assert rec.steps[0].prefill_tokens == 8  # the chunk budget, shared by the first two prompts


def test_each_request_reports_its_phases_and_finish_reason():
    e, rec = engine()
    vocab = e.model.config.vocab_size
    a, b, c = random_prompts(vocab, [4, 4, 4], seed=1)
    e.add_request(a, SamplingParams(max_tokens=2, **GREEDY), request_id="a")
    e.add_request(b, SamplingParams(max_tokens=50, **GREEDY), request_id="b")
    e.add_request(c, SamplingParams(max_tokens=2, **GREEDY), request_id="queued")  # no slot yet
    e.step()
    assert e.abort("b") and e.abort("queued")
    while e.has_unfinished():
        e.step()
    by_id = {r.request_id: r for r in rec.requests}
    assert {r: s.finish_reason for r, s in by_id.items()} == {"a": "length", "b": "aborted", "queued": "aborted"}
    assert set(FINISH_REASONS) >= {s.finish_reason for s in rec.requests}
    done = by_id["a"]
    assert done.completion_tokens == 2 and done.prompt_tokens == 4 and done.adapter is None
    assert done.queue_s >= 0 and done.prefill_s >= 0 and done.decode_s >= 0
    assert by_id["b"].completion_tokens == 1 and by_id["b"].decode_s is not None
    never_ran = by_id["queued"]
    assert never_ran.queue_s is None and never_ran.prefill_s is None and never_ran.decode_s is None


def test_prefix_cache_hits_and_kv_occupancy_in_stats():
    e, rec = engine(prefix_block_size=4)
    vocab = e.model.config.vocab_size
    shared = random_prompts(vocab, [12], seed=2)[0]
    e.add_request(shared + [1, 2], SamplingParams(max_tokens=1, **GREEDY))
    while e.has_unfinished():
        e.step()
    e.add_request(shared + [3, 4, 5], SamplingParams(max_tokens=4, **GREEDY))
    e.step()
    stats = e.stats()
    assert stats["running"] == 1 and stats["kv_cache_tokens_total"] == 2 * e.max_seq_len
    assert stats["kv_cache_tokens_used"] == len(shared) + 3  # cached blocks copied in + its own prompt
    while e.has_unfinished():
        e.step()
    assert rec.requests[-1].cached_prompt_tokens == 12 == e.stats()["prefix_cache_hit_tokens"]
    assert e.stats()["prefix_cache_query_tokens"] == 14 + 15
    assert e.stats()["kv_cache_tokens_used"] == 0 and e.stats()["max_waiting"] == e.max_waiting


def test_no_listener_no_reports():
    e, rec = engine()
    e.set_stats_listener(None)
    e.add_request([1, 2, 3], SamplingParams(max_tokens=2, **GREEDY))
    while e.has_unfinished():
        e.step()
    assert rec.steps == [] and rec.requests == []
