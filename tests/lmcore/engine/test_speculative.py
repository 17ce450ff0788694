"""Speculative decoding (lmcore.engine.speculative): greedy output identical to plain decoding,
sampled output from the same distribution, exact stops, rollback, logprobs, cancel, reproducibility."""

from __future__ import annotations

import random

import pytest
import torch

from lmcore import Engine, SamplingParams, generate
from lmcore.engine.speculative import DraftAsk, DraftModel, prompt_lookup, verify
from tests.helpers.models import SHAPES, gpt2_vocab_model, greedy_without_cache, random_model, random_prompts


def run(engine, prompts, params):
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    got: dict[str, list[int]] = {}
    outs: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            outs.setdefault(o.request_id, []).append(o)
    return [got[i] for i in ids], [outs[i] for i in ids]


def test_prompt_lookup_proposes_what_followed_the_latest_longest_match():
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]  # latest occurrence of 1 2 3
    assert prompt_lookup([4, 5, 6, 4, 5, 8, 5], 3) == [8, 5]  # no 3-/2-gram match: the 1-gram "5"
    assert prompt_lookup([1, 2, 3, 4], 3) == []
    assert prompt_lookup([7, 7, 7], 5) == [7]  # a match at the end proposes what there is


def test_prompt_lookup_proposes_two_tokens_per_matched_token():
    text = [9, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13]
    assert prompt_lookup(text + [8], 8) == [10, 11]  # a 1-gram match: weak evidence, 2 tokens
    assert prompt_lookup(text + [7, 8], 8) == [10, 11, 12, 13]  # a 2-gram match: 4
    assert prompt_lookup(text + [2, 3, 4, 5], 16) == [6, 7, 8, 10, 11, 12, 13, 2]  # a 4-gram: 8 (it runs on into the text that followed)
    assert prompt_lookup(text + [2, 3, 4, 5], 3) == [6, 7, 8]  # never more than k
    assert prompt_lookup(text + [3, 4], 8, tokens_per_match=1) == [5, 6]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_speculation_equals_plain_decoding_batched_with_plain_requests(shape):
    dims = SHAPES[shape]
    model = random_model(11, **dims)
    V = dims["vocab_size"]
    base = random_prompts(V, [6, 9, 4], seed=12)
    prompts = [b * 4 for b in base] + random_prompts(V, [9, 5, 13], seed=13)  # repetitive, then not
    n = 24
    modes = ["prompt_lookup", "off", "auto", "prompt_lookup", "auto", "off"]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, speculation=m) for m in modes]
    e = Engine(model, max_batch_size=6, prefill_chunk_size=32, max_seq_len=min(64, dims["block_size"]))
    got, outs = run(e, prompts, params)
    assert got == [greedy_without_cache(model, p, n) for p in prompts]
    s = e.stats()
    assert s["spec_accepted_tokens"] > 0 and s["spec_proposed_tokens"] >= s["spec_accepted_tokens"]
    assert s["tokens_generated"] == 6 * n
    assert len(outs[1]) == n and len(outs[0]) < n  # plain: a token per step; speculating: several at once


def test_greedy_speculation_on_the_shipped_model_with_code_prompts():
    from bench.pycode_data import PYCODE_DIR
    from lmcore import load_model

    model = load_model(PYCODE_DIR)
    tok = model.tokenizer
    texts = ["    def __init__(self, data):\n        self.data = data\n\n    def __len__(self):\n        return len(self.",
             "import os\nimport sys\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n    parser.add_argument(",
             "class Stack:\n", "x = 1\n"]
    prompts = [tok.encode(t) for t in texts]
    on = generate(model, prompts, SamplingParams(max_tokens=40, temperature=0.0, speculation="prompt_lookup"))
    off = generate(model, prompts, SamplingParams(max_tokens=40, temperature=0.0, speculation="off"))
    assert [c.token_ids for c in on] == [c.token_ids for c in off]
    assert [c.text for c in on] == [c.text for c in off]


def test_the_shipped_draft_on_the_shipped_model_is_exact_and_accepted():
    """models/pycode-draft shares pycode's tokenizer file for file, and drafting for pycode on code
    prompts gives plain greedy decoding's tokens, most proposals accepted."""
    from bench.pycode_data import PYCODE_DIR
    from lmcore import load_model

    draft_dir = PYCODE_DIR.parent / "pycode-draft"
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert (draft_dir / name).read_bytes() == (PYCODE_DIR / name).read_bytes(), name
    model, draft = load_model(PYCODE_DIR), load_model(draft_dir)
    tok = model.tokenizer
    texts = ["    def __init__(self, data):\n        self.data = data\n\n    def __len__(self):\n        return len(self.",
             "import os\nimport sys\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n", "class Stack:\n"]
    prompts = [tok.encode(t) for t in texts]
    params = [SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, speculation=m)
              for m in ("draft", "off", "draft")]
    e = Engine(model, max_batch_size=3, draft_model=draft, speculative_tokens=4)  # the default confidence stop
    got, _ = run(e, prompts, params)
    assert got == [greedy_without_cache(model, p, 32) for p in prompts]
    s = e.stats()
    assert s["spec_accepted_tokens"] > s["spec_proposed_tokens"] / 3


def test_the_draft_corpus_is_pycodes_greedy_output_on_training_windows_only(tmp_path):
    """The shipped draft's distillation corpus (bench/pycode_data.py): each sample is a training
    window's prompt plus pycode's own greedy continuation; no held-out window is a prompt."""
    from bench.pycode_data import PYCODE_DIR, heldout_windows, training_windows, write_draft_corpus
    from lmcore import load_model

    files = write_draft_corpus(tmp_path, prompt_len=16, new_tokens=5, limit=3, per_file=2)
    assert [f.name for f in files] == ["distill_000.txt", "distill_001.txt"]
    samples = "\n\n".join(f.read_text() for f in files).split("\n\n")
    model = load_model(PYCODE_DIR)
    tok = model.tokenizer
    train, held = training_windows(tok), heldout_windows(tok)
    assert len(train) + len(held) == 5056 and len(held) == 253
    held_prompts = {tuple(w[:16].tolist()) for w in held}
    want = []
    for w in train[:3]:
        prompt = w[:16].tolist()
        assert tuple(prompt) not in held_prompts
        want.append(tok.decode(prompt + greedy_without_cache(model, prompt, 5)))
    assert "\n\n".join(want) == "\n\n".join(samples)


def test_draft_model_speculation_is_exact_and_a_perfect_draft_is_always_accepted():
    model = random_model(21)
    prompts = random_prompts(512, [5, 9, 14], seed=22)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, speculation="draft", ignore_eos=True)
    want = [greedy_without_cache(model, p, 16) for p in prompts]
    for draft, perfect in ((random_model(23), False), (random_model(21), True)):
        e = Engine(model, max_batch_size=3, draft_model=draft, speculative_tokens=3,
                   draft_min_confidence=0.0)
        got, _ = run(e, prompts, [greedy] * 3)
        assert got == want
        s = e.stats()
        assert s["spec_proposed_tokens"] > 0
        assert (s["spec_accepted_tokens"] == s["spec_proposed_tokens"]) == perfect
    with pytest.raises(ValueError, match="no draft model"):
        Engine(model).add_request([1], greedy)
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(model, draft_model=random_model(1, **SHAPES["one-head"]))
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
        Engine(model, draft_model=random_model(23), draft_min_confidence=1.5)


def test_draft_model_kv_cache_proposes_what_the_uncached_draft_would():
    """The draft's own KV cache: after partial acceptance (rollback), a full one, a new request in
    the slot sharing only part of the prompt, and at the end of its context, every greedy proposal
    equals the argmax loop that re-runs the whole sequence."""
    draft = random_model(23, **(SHAPES["tiny"] | dict(block_size=32)))
    d = DraftModel(draft, 512, n_slots=2, max_seq_len=32, min_confidence=0.0)  # never cut short
    greedy = SamplingParams(temperature=0.0)
    seq = random_prompts(512, [7], seed=24)[0]
    other = seq[:3] + random_prompts(512, [6], seed=25)[0]  # shares a 3-token prefix with seq
    for slot, tokens, kept in ((0, seq, 1), (0, None, 4), (0, None, 0), (1, other, 2), (0, other, 4)):
        tokens = tokens if tokens is not None else seq
        proposal, probs = d.propose(slot, tokens, 4, greedy, random.Random(0))
        assert proposal == greedy_without_cache(draft, tokens, 4) and probs is None
        if tokens is seq:  # the verify step kept `kept` proposed tokens and one of its own
            seq = seq + proposal[:kept] + [(proposal[kept] + 1) % 512 if kept < 4 else 5]
    long = random_prompts(512, [30], seed=26)[0]
    assert d.propose(1, long, 4, greedy, random.Random(0))[0] == greedy_without_cache(draft, long, 3)  # 32 - 30 + 1
    assert d.propose(1, long + [1, 2, 3], 4, greedy, random.Random(0)) == ([], None)


def test_draft_proposals_batched_across_sequences_equal_each_sequence_alone():
    """propose_many runs one draft forward per step for every sequence: its proposals are each
    sequence's own (greedy: the uncached argmax loop), with slots out of order and holes between
    them, one sequence catching up a segment while another feeds one token, one at the end of the
    draft's context, and sampled rows drawing from their own streams as they would alone."""
    draft = random_model(23, **(SHAPES["tiny"] | dict(block_size=32)))
    greedy, sampled = SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=20)
    a, b, c = random_prompts(512, [9, 6, 30], seed=27)
    batched = DraftModel(draft, 512, n_slots=5, max_seq_len=32, min_confidence=0.0)
    first = batched.propose_many([DraftAsk(4, a, 4, greedy, None), DraftAsk(0, b, 4, greedy, None),
                                  DraftAsk(2, c, 4, greedy, None)])
    assert [p for p, _ in first] == [greedy_without_cache(draft, a, 4), greedy_without_cache(draft, b, 4),
                                     greedy_without_cache(draft, c, 3)]  # c: 32 - 30 + 1 fit its context
    assert batched.forwards == 4  # every sequence in each of the 4 steps (c leaving after 3)
    # next step: a kept everything (one new token to feed), b kept 1 (a 2-token segment), plus sampled rows
    a2, b2 = a + first[0][0] + [7], b + first[1][0][:1] + [8]
    asks = [DraftAsk(4, a2, 3, sampled, random.Random(5)), DraftAsk(0, b2, 3, greedy, None),
            DraftAsk(1, a, 2, sampled, random.Random(6))]
    together = batched.propose_many(asks)
    alone = DraftModel(draft, 512, n_slots=5, max_seq_len=32, min_confidence=0.0)
    alone.propose(4, a, 4, greedy, None)
    alone.propose(0, b, 4, greedy, None)
    for (slot, tokens, k, params, _), (got, probs) in zip(asks, together):
        want, want_probs = alone.propose(slot, tokens, k, params, random.Random(5 if slot == 4 else 6))
        assert got == want
        assert (probs is None) == (want_probs is None)
        if probs is not None:
            torch.testing.assert_close(probs, want_probs, rtol=1e-4, atol=1e-6)
    assert together[1][0] == greedy_without_cache(draft, b2, 3)


def test_a_draft_that_keeps_doubting_rests_for_longer_and_longer():
    """A draft that never proposes (it doubts every first token) sits out 1, 2, 4, 8, 8 ... steps
    between tries, so it runs ~log(n) + n/8 forwards instead of one per token; output unchanged."""
    model = random_model(21)
    prompt = random_prompts(512, [6], seed=22)[0]
    greedy = SamplingParams(max_tokens=40, temperature=0.0, speculation="draft", ignore_eos=True)
    e = Engine(model, max_batch_size=2, draft_model=random_model(23), speculative_tokens=3,
               draft_min_confidence=1.0)  # doubts everything short of certainty
    got, _ = run(e, [prompt], [greedy])
    assert got == [greedy_without_cache(model, prompt, 40)]
    s = e.stats()
    # decode steps 1..39 (the prefill samples the first token): tries at 1, 3, 6, 11, 20, 29, 38
    assert s["spec_draft_forwards"] == 7 and s["spec_proposed_tokens"] == 0
    e = Engine(model, max_batch_size=2, draft_model=random_model(21), speculative_tokens=3,
               draft_min_confidence=0.0)  # a perfect draft never rests: every proposal is taken
    got, _ = run(e, [prompt], [greedy])
    assert got == [greedy_without_cache(model, prompt, 40)]
    assert e.stats()["spec_accepted_tokens"] == e.stats()["spec_proposed_tokens"] > 0


def test_draft_proposal_stops_at_the_first_token_the_draft_doubts():
    """A proposal ends before the first token the draft gives less than ``min_confidence`` (no
    proposal at all when it doubts the first), and the draft's cache stays right for the next one."""
    draft = random_model(29, **(SHAPES["tiny"] | dict(block_size=32)))
    seq = random_prompts(512, [7], seed=28)[0]
    full = greedy_without_cache(draft, seq, 4)
    with torch.inference_mode():
        logits = draft(torch.tensor([seq + full]))[0, len(seq) - 1:len(seq) + 3].log_softmax(-1)
    confidence = logits.exp().max(-1).values.tolist()  # the draft's probability of each greedy token
    cut = min(range(1, 4), key=lambda j: confidence[j])  # stop before the least sure of tokens 2..4
    greedy = SamplingParams(temperature=0.0)
    d = DraftModel(draft, 512, n_slots=1, max_seq_len=32, min_confidence=confidence[cut] + 1e-6)
    first_doubt = next(j for j in range(4) if confidence[j] < d.min_confidence)
    assert first_doubt > 0  # this seed's draft is sure of its first token: a cut mid-proposal
    assert d.propose(0, seq, 4, greedy, random.Random(0)) == (full[:first_doubt], None)
    d.min_confidence = 1.0  # doubts everything short of certainty: proposes nothing
    assert d.propose(0, seq, 4, greedy, random.Random(0)) == ([], None)
    d.min_confidence = 0.0
    assert d.propose(0, seq + full[:2], 4, greedy, random.Random(0))[0] == greedy_without_cache(draft, seq + full[:2], 4)


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 5  # pool the rare tail into one cell
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    return float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum()), int(keep.sum())


@pytest.mark.parametrize("proposer", ["point", "draft"])
def test_verified_tokens_follow_the_target_distribution(proposer):
    """The accept/reject rule with the residual: each emitted token is distributed as the target's
    p, whatever was proposed (a chi-square test over 6,000 draws; the wrong rule fails it)."""
    torch.manual_seed(0)
    V, k = 12, 2
    logits = torch.randn(k + 1, V) * 1.5
    params = SamplingParams(temperature=0.8, top_k=10)
    from lmcore.engine.speculative import _probs

    p = _probs(logits, params)
    q = torch.softmax(torch.randn(k, V), -1)
    rng = random.Random(1)
    first = torch.zeros(V)
    second = torch.zeros(V)
    n_second = 0
    for _ in range(6000):
        if proposer == "point":
            draft, dq = [3, 5], None
        else:
            draft = [int(torch.multinomial(q[j], 1, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))))
                     for j in range(k)]
            dq = q
        out = verify(logits, draft, dq, params, rng)
        first[out[0]] += 1
        if len(out) > 1:  # the second token is from row 1 only when the first was the draft's
            second[out[1]] += 1
            n_second += 1
    stat, cells = _chi2(first, p[0])
    assert stat < cells + 6 * cells ** 0.5, (stat, cells)  # ~6 sigma: a fixed seed, far from the edge
    assert first[p[0] == 0].sum() == 0  # top-k-filtered tokens are never emitted
    if proposer == "point":  # given the first token was the draft's 3, the next is distributed as p[1]
        stat, cells = _chi2(second, p[1])
        assert stat < cells + 6 * cells ** 0.5, (stat, cells)
        assert n_second == int(first[3])


def test_sampled_speculation_end_to_end_matches_plain_sampling_distribution():
    model = random_model(31, scale=3.0, **SHAPES["one-head"])
    prompt = random_prompts(97, [24], seed=32)[0] * 2
    plain, spec = torch.zeros(97), torch.zeros(97)
    n = 300
    for mode, counts in (("off", plain), ("prompt_lookup", spec)):
        params = [SamplingParams(max_tokens=4, temperature=1.0, seed=s, speculation=mode, ignore_eos=True)
                  for s in range(n)]
        e = Engine(model, max_batch_size=32, max_waiting=n, enable_prefix_cache=False)
        got, _ = run(e, [prompt] * n, params)
        assert (e.stats()["spec_accepted_tokens"] > 0) == (mode != "off")
        for toks in got:
            counts[toks[3]] += 1  # the fourth token: after speculative steps
    # two-sample chi-square on the cells both saw often
    keep = (plain + spec) > 10
    a, b = plain[keep], spec[keep]
    stat = float(((a - b) ** 2 / (a + b)).sum())
    dof = int(keep.sum()) - 1
    assert stat < dof + 6 * (2 * dof) ** 0.5 + 10, (stat, dof)


def test_seeded_sampled_speculation_is_reproducible_alone_or_batched():
    model = random_model(41)
    base = random_prompts(512, [5, 8, 3], seed=42)
    prompts = [b * 3 for b in base]
    params = [SamplingParams(max_tokens=20, temperature=0.9, seed=i, speculation="prompt_lookup", ignore_eos=True)
              for i in range(3)]
    alone = [generate(model, [p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    together = generate(model, prompts, params)
    assert [c.token_ids for c in together] == alone


def test_stop_strings_max_tokens_and_logprobs_are_exact_across_accepted_runs(tokenizer):
    model = gpt2_vocab_model(51)
    text = "the cat sat on the mat. the cat sat on the mat. the cat"
    prompt = tokenizer.encode(text)
    off = generate(model, [prompt], SamplingParams(max_tokens=40, temperature=0.0, speculation="off", ignore_eos=True),
                   tokenizer=tokenizer)[0]
    continuation = off.text
    stop = continuation[len(continuation) // 2:len(continuation) // 2 + 3]
    for m in range(1, 12):  # max_tokens landing anywhere inside a proposal
        kw = dict(max_tokens=m, temperature=0.0, ignore_eos=True, logprobs=2)
        a = generate(model, [prompt], SamplingParams(speculation="prompt_lookup", **kw), tokenizer=tokenizer)[0]
        b = generate(model, [prompt], SamplingParams(speculation="off", **kw), tokenizer=tokenizer)[0]
        assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason == "length"
        assert [x.token_id for x in a.logprobs] == a.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
    kw = dict(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])
    a = generate(model, [prompt], SamplingParams(speculation="prompt_lookup", **kw), tokenizer=tokenizer)[0]
    b = generate(model, [prompt], SamplingParams(speculation="off", **kw), tokenizer=tokenizer)[0]
    assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, "stop")
    # structured output speculates too, its proposals checked against the grammar: the same constrained
    # tokens (tests/lmcore/engine/test_constraints.py covers it in depth)
    kw = dict(max_tokens=12, temperature=0.0, regex="( the cat| sat| on| mat\\.)+")
    e = Engine(model, tokenizer=tokenizer)
    got, outs = run(e, [prompt], [SamplingParams(speculation="prompt_lookup", **kw)])
    b = generate(model, [prompt], SamplingParams(speculation="off", **kw), tokenizer=tokenizer)[0]
    assert got[0] == b.token_ids and e.stats()["spec_decode_steps"] > 0


def test_cancel_mid_speculation_frees_the_slot_and_the_cache_rolls_back():
    model = random_model(61)
    prompt = random_prompts(512, [6], seed=62)[0] * 4
    spec = SamplingParams(max_tokens=30, temperature=0.0, speculation="prompt_lookup", ignore_eos=True)
    e = Engine(model, max_batch_size=1)
    rid = e.add_request(prompt, spec)
    while e.stats()["spec_decode_steps"] == 0:
        e.step()
    assert e.abort(rid)
    other = random_prompts(512, [7], seed=63)[0]
    got, _ = run(e, [other], [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)])
    assert got == [greedy_without_cache(model, other, 8)]  # the freed slot's stale keys never leak
    # penalised requests never speculate
    e2 = Engine(model, max_batch_size=1)
    run(e2, [prompt], [SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.2,
                                      speculation="prompt_lookup")])
    assert e2.stats()["spec_decode_steps"] == 0
