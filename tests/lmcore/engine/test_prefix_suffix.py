"""The prefix cache costs only the suffix: a request sharing a cached prefix computes just its new
tokens (counted through the engine's stats), and the pool's copies in and out are exact."""

from __future__ import annotations

import torch

from lmcore import Engine, SamplingParams
from lmcore.model.kv_cache import BlockPool, KVCache
from tests.helpers.models import random_model, random_prompts


def test_a_shared_prefix_costs_only_the_suffix_tokens():
    model = random_model(0, n_layer=2, n_head=2, n_embd=32, block_size=1024, vocab_size=300)
    prefix = random_prompts(300, [960], seed=1)[0]  # 60 blocks of 16
    a, b = prefix + [1, 2, 3, 4, 5], prefix + [6, 7, 8, 9, 10]
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    cached = Engine(model, max_batch_size=2, prefill_chunk_size=256)
    plain = Engine(model, max_batch_size=2, prefill_chunk_size=256, enable_prefix_cache=False)

    def run(engine, prompt):
        rid = engine.add_request(prompt, greedy)
        toks = []
        while engine.has_unfinished():
            toks += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
        return toks

    assert run(cached, a) == run(plain, a)
    before = cached.stats()
    assert before["prompt_tokens_computed"] == 965
    steps = before["steps"]
    assert run(cached, b) == run(plain, b)
    after = cached.stats()
    assert after["prompt_tokens_computed"] - before["prompt_tokens_computed"] == 5  # the suffix only
    assert after["prefix_cache_hit_tokens"] == 960
    assert after["steps"] - steps == 4  # the suffix and the first token in one step, then 3 decodes


def test_pool_copies_are_exact_for_scattered_rows():
    torch.manual_seed(0)
    cache = KVCache(n_layer=3, n_slots=2, n_head=2, max_seq_len=64, head_dim=4)
    cache.k.normal_()
    cache.v.normal_()
    pool = BlockPool(num_blocks=8, block_size=4, n_layer=3, n_head=2, head_dim=4)
    rows = [5, 6, 2, 3, 4, 0]  # runs of consecutive rows and single ones
    pool.save(cache, 1, list(enumerate(rows)))
    for j, row in enumerate(rows):
        assert torch.equal(pool.k[row], cache.k[:, 1, :, 4 * j:4 * j + 4])
        assert torch.equal(pool.v[row], cache.v[:, 1, :, 4 * j:4 * j + 4])
    before = cache.k[:, 0, :, 24:].clone()
    pool.load(cache, 0, rows)
    assert torch.equal(cache.k[:, 0, :, :24], cache.k[:, 1, :, :24])
    assert torch.equal(cache.v[:, 0, :, :24], cache.v[:, 1, :, :24])
    assert torch.equal(cache.k[:, 0, :, 24:], before)  # nothing past the prefix is touched
