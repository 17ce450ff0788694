"""The model runner alone: hand-built schedules in, the step's flat layout and next tokens out.

The engine tests check the runner end to end through the scheduler; these pin down its own
contract: :meth:`ModelRunner.prepare` lays decode rows first (ascending slot) and prefill chunks
after, writes each token's keys at ``(slot * nh + head) * max_seq + position``, and covers slot
holes with dummy rows; :meth:`ModelRunner.execute` samples from exactly the rows that complete a
token, and its greedy tokens are the argmax of the model's plain, cache-free forward.
"""

from __future__ import annotations

import random

import pytest
import torch

from lmcore.engine import SamplingParams
from lmcore.engine.runner import ModelRunner
from lmcore.engine.scheduler import PrefillChunk, SchedulerOutput, Sequence, SequenceStatus
from tests.helpers.models import SHAPES, random_model, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _runner(model, n_slots=4, max_seq_len=64, prepack=True) -> ModelRunner:
    return ModelRunner(model, n_slots, max_seq_len, torch.device("cpu"), torch.float32, prepack_weights=prepack)


def _seq(rid: str, prompt: list[int], slot: int) -> Sequence:
    return Sequence(rid, prompt, max_tokens=8, status=SequenceStatus.RUNNING, slot=slot)


def _run(runner: ModelRunner, decode: list[Sequence], prefill: list[PrefillChunk], admitted=()) -> dict:
    """One step by hand (the scheduler's part: admit, then advance); ``{request id: token}``."""
    for seq in admitted:
        runner.admit(seq, GREEDY)
    seqs = decode + [c.seq for c in prefill]
    params = {s.request_id: GREEDY for s in seqs}
    rngs = {s.request_id: random.Random(0) for s in seqs}
    samplers, ids, logprobs = runner.execute(SchedulerOutput(decode, prefill, list(admitted)), params, rngs)
    assert logprobs is None
    for seq in decode:
        seq.num_computed += 1
    for chunk in prefill:
        chunk.seq.num_computed = chunk.end
    out = {}
    for seq, tok in zip(samplers, ids):
        seq.output_ids.append(tok)
        out[seq.request_id] = tok
    return out


@torch.no_grad()
def _next_token(model, seq: Sequence) -> int:
    """The plain forward's greedy next token after the sequence's prompt and outputs so far."""
    ids = seq.prompt_ids + seq.output_ids
    return int(model(torch.tensor([ids]))[0, -1].argmax())


@pytest.mark.parametrize("prepack", [True, False])
def test_decode_and_prefill_rows_give_the_plain_forwards_next_tokens(prepack):
    model = random_model(30, **SHAPES["narrow-heads"])
    runner = _runner(model, prepack=prepack)
    pa, pb, pc = random_prompts(model.config.vocab_size, [6, 11, 4], seed=30)
    a, b, c = _seq("a", pa, 0), _seq("b", pb, 2), _seq("c", pc, 3)
    # step 1: a and c prefill whole prompts, b its first 5 tokens (so samples nothing yet)
    want = {"a": _next_token(model, a), "c": _next_token(model, c)}
    assert _run(runner, [], [PrefillChunk(a, 0, 6), PrefillChunk(c, 0, 4), PrefillChunk(b, 0, 5)], [a, c, b]) == want
    # step 2: a and c decode around a hole (slot 1 free, slot 2 prefilling) while b's chunk from
    # position 5 completes its prompt; steps 3-4: all three decode together
    want = {s.request_id: _next_token(model, s) for s in (a, b, c)}
    assert _run(runner, [a, c], [PrefillChunk(b, 5, 11)]) == want
    for _ in range(2):
        want = {s.request_id: _next_token(model, s) for s in (a, b, c)}
        assert _run(runner, [a, b, c], []) == want
    assert [len(s.output_ids) for s in (a, b, c)] == [4, 3, 4]


def test_prepare_lays_out_a_batch_with_slot_holes():
    model = random_model(31)
    runner = _runner(model, n_slots=4, max_seq_len=32)
    nh, T = model.config.n_head, 32
    # slot 0 decodes at position 5, slot 3 at position 7; slot 1 is free and slot 2 prefills 4..6
    a, c = _seq("a", list(range(5)), 0), _seq("c", list(range(7)), 3)
    a.num_computed, a.output_ids = 5, [11]
    c.num_computed, c.output_ids = 7, [13]
    b = _seq("b", [20, 21, 22, 23, 24, 25, 26], 2)
    b.num_computed = 4
    out = SchedulerOutput([a, c], [PrefillChunk(b, 4, 7)], [])
    params = {s: GREEDY for s in "abc"}
    step = runner.prepare(out, params, {s: random.Random(0) for s in "abc"})

    assert step.tokens.tolist() == [11, 13, 24, 25, 26]  # decode rows first, ascending slot
    batch = step.batch
    assert batch.slots.tolist() == [0, 3, 2, 2, 2] and batch.positions.tolist() == [5, 7, 4, 5, 6]
    assert batch.write_index.tolist() == [(s * nh + h) * T + p for s, p in [(0, 5), (3, 7), (2, 4), (2, 5), (2, 6)]
                                          for h in range(nh)]
    assert (batch.num_decode, batch.decode_lo, batch.decode_hi, batch.decode_len) == (2, 0, 4, 8)
    assert batch.decode_index.tolist() == [0, 3]  # decode rows within the slot range 0..3
    visible = batch.decode_mask[:, 0, 0, :] == 0  # (4 range rows, 8 keys)
    assert visible.tolist() == [[p <= q for p in range(8)] for q in (5, 0, 0, 7)]  # holes: a dummy at 0
    (seg,) = batch.prefill
    assert (seg.row_start, seg.row_end, seg.slot, seg.start_pos) == (2, 5, 2, 4)
    assert seg.mask.tolist() == [[k <= q for k in range(7)] for q in (4, 5, 6)]
    # a, c and b (its chunk completes the prompt) sample, from rows 0, 1 and the chunk's last
    assert [s.request_id for s in step.samplers] == ["a", "c", "b"] and step.rows.tolist() == [0, 1, 4]
    assert step.slots.tolist() == [0, 3, 2]
    assert step.uniforms is None and step.greedy is None and step.adapters is None  # all greedy, no bank


def test_prepare_without_holes_needs_no_mask_and_draws_for_sampled_rows():
    runner = _runner(random_model(32), n_slots=3)
    seqs = []
    for i in range(3):
        s = _seq(f"r{i}", [1, 2, 3], i)
        s.num_computed, s.output_ids = 3, [4]
        seqs.append(s)
    params = {"r0": GREEDY, "r1": SamplingParams(temperature=0.8, seed=1), "r2": GREEDY}
    rngs = {rid: random.Random(7) for rid in params}
    step = runner.prepare(SchedulerOutput(seqs, [], []), params, rngs)
    b = step.batch
    assert (b.decode_lo, b.decode_hi, b.decode_len) == (0, 3, 4)
    assert b.decode_mask is None and b.decode_index is None and b.prefill == ()  # same length, no holes
    assert step.rows is None  # the first R rows sample
    assert step.uniforms.tolist() == pytest.approx([0.0, random.Random(7).random(), 0.0])
    assert step.greedy.tolist() == [True, False, True]
