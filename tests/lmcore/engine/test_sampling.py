"""SamplingParams validation, the sampling functions, and stop-string streaming."""

from __future__ import annotations

import pydantic
import pytest
import torch

from lmcore.engine.sampling import (
    SamplingParams,
    apply_penalties,
    logits_to_probs,
    sample_from_probs,
    top_logprobs,
)
from lmcore.engine.text_stream import TextStream


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("temperature", -0.1), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
    ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
    ("logprobs", 21), ("logprobs", -1), ("stop", ["a"] * 9), ("stop", ["ok", ""]), ("seed", "abc"),
    ("bogus_field", 1),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(pydantic.ValidationError, match=field) as e:
        SamplingParams(**{field: value})
    assert isinstance(e.value, ValueError)


def test_defaults_and_conveniences():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.logprobs, p.stop, p.seed) == (16, 1.0, 0, 1.0, 0, [], None)
    assert SamplingParams(stop="\n").stop == ["\n"]
    assert SamplingParams(temperature=0).greedy
    assert not p.uses_penalties and SamplingParams(presence_penalty=0.5).uses_penalties
    a, b = SamplingParams(seed=5).make_rng(), SamplingParams(seed=5).make_rng()
    assert [a.random() for _ in range(3)] == [b.random() for _ in range(3)]


def test_top_k_keeps_k_tokens_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [1.0, 2.0, 2.0, 0.0, 2.0]])
    probs = logits_to_probs(logits, torch.ones(2), top_k=torch.tensor([2, 1]), k_max=2)
    assert (probs[0] > 0).tolist() == [False, True, False, True, False]
    assert (probs[1] > 0).tolist() == [False, True, True, False, True]  # ties with the k-th are kept
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    off = logits_to_probs(logits, torch.ones(2), top_k=torch.tensor([0, 0]), k_max=0)
    assert (off > 0).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs_in = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs_in.log()
    kept = lambda p: (logits_to_probs(logits, torch.ones(1), top_p=torch.tensor([p]))[0] > 0).tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False, False]
    assert kept(0.6) == [True, True, False, False, False]
    assert kept(0.84) == [True, True, True, False, False]
    assert kept(0.01) == [True, False, False, False, False]  # never empty
    assert kept(1.0) == [True] * 5


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold = logits_to_probs(logits, torch.tensor([0.5]))[0]
    hot = logits_to_probs(logits, torch.tensor([2.0]))[0]
    assert torch.allclose(cold, torch.softmax(logits[0] / 0.5, -1))
    assert cold[0] > torch.softmax(logits[0], -1)[0] > hot[0]


def test_inverse_cdf_sampling_follows_the_distribution_exactly():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    n = 1000
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n  # evenly spread uniforms
    picks = sample_from_probs(probs.expand(n, 4).contiguous(), u)
    counts = torch.bincount(picks, minlength=4).tolist()
    assert counts == [100, 0, 600, 300]
    # unnormalised rows (after filtering) and u at the very top never pick a zero-mass token
    row = torch.tensor([[0.2, 0.3, 0.0, 0.0]])
    assert sample_from_probs(row, torch.tensor([0.9999999])).item() == 1
    assert sample_from_probs(row, torch.tensor([0.0])).item() == 0


def test_penalties_match_transformers_repetition_penalty():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    seq = torch.tensor([[1, 2, 3, 3], [7, 8, 9, 40]])
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, seq, True)
    zero = torch.zeros(2, 50)
    ours = apply_penalties(logits, seen, zero, torch.tensor([1.3, 1.3]), torch.zeros(2), torch.zeros(2))
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seq, logits.clone())
    torch.testing.assert_close(ours, ref)
    neutral = apply_penalties(logits, seen, zero + 3, torch.ones(2), torch.zeros(2), torch.zeros(2))
    assert torch.equal(neutral, logits)


def test_presence_and_frequency_penalties_follow_openai():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    out = apply_penalties(logits, counts > 0, counts, torch.ones(1), torch.tensor([0.5]), torch.tensor([0.25]))
    assert out[0].tolist() == [0.0, -0.75, -1.25, 0.0]


def test_top_logprobs_are_log_softmax_of_raw_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    chosen, values, ids = top_logprobs(logits, torch.tensor([0]), 2)
    ref = torch.log_softmax(logits, -1)[0]
    assert chosen.item() == pytest.approx(ref[0].item())
    assert ids.tolist() == [[2, 1]] and values[0].tolist() == pytest.approx([ref[2].item(), ref[1].item()])


class _CharDecoder:
    """A stream decoder over a fixed token->text table (the real one is tested with the tokenizer)."""

    def __init__(self, table):
        self.table = table

    def push(self, i):
        return self.table[i]

    def flush(self):
        return ""


def _run(pieces, stop):
    ts = TextStream(_CharDecoder(dict(enumerate(pieces))), stop)
    out = []
    for i in range(len(pieces)):
        out.append(ts.push(i))
        if ts.stopped:
            break
    else:
        out.append(ts.finish())
    return out, ts.stopped


def test_stop_string_split_across_tokens_is_cut_and_never_emitted():
    out, stopped = _run(["Hello", " wor", "ld\n", "\nQ:", " next"], ["\n\nQ:"])
    assert stopped and "".join(out) == "Hello world"
    assert out == ["Hello", " wor", "ld", ""]  # the "\n" was held back, then dropped with the stop


def test_held_back_text_is_released_when_it_cannot_be_a_stop():
    out, stopped = _run(["ab", "c#", "#d", "e"], ["##x"])
    assert not stopped
    assert out == ["ab", "c", "##d", "e", ""]
    out, stopped = _run(["ab", "c#"], ["##x"])
    assert out == ["ab", "c", "#"]  # released at the end of generation


def test_earliest_stop_wins_and_no_stops_means_no_holdback():
    out, stopped = _run(["xx END yy STOP"], ["STOP", "END"])
    assert out == ["xx "] and stopped
    out, _ = _run(["a", "b"], [])
    assert out == ["a", "b", ""]


def test_text_stream_with_the_real_decoder_emits_whole_characters(gpt2_tiktoken_path):
    from lmcore.tokenizer import Tokenizer

    tok = Tokenizer.from_file(gpt2_tiktoken_path)
    text = "naïve café 😀🎉 done. STOP here"
    ids = tok.encode(text)
    assert any(not tok.token_bytes(i).decode("utf-8", errors="ignore") for i in ids)  # split characters
    ts = TextStream(tok.stream_decoder(), [" STOP"])
    deltas = []
    for i in ids:
        deltas.append(ts.push(i))
        if ts.stopped:
            break
    assert ts.stopped and "".join(deltas) == "naïve café 😀🎉 done."
    assert all("\ufffd" not in d for d in deltas)
