"""score(): continuation log-likelihoods against log-probabilities computed from transformers' logits."""

from __future__ import annotations

import pytest
import torch

from lmcore import score
from lmcore.tasks import ChoiceScore
from tests.helpers.models import SHAPES, random_model, random_prompts, to_transformers


@pytest.mark.parametrize("shape", ["tiny", "narrow-heads"])
def test_scores_match_transformers(tmp_path, shape):
    model = random_model(40, **SHAPES[shape])
    hf = to_transformers(model, tmp_path)
    vocab = model.config.vocab_size
    context = random_prompts(vocab, [11], seed=1)[0]
    choices = random_prompts(vocab, [1, 4, 9, 2], seed=2)
    got = score(model, context, choices)
    for cont, s in zip(choices, got):
        ids = torch.tensor([context + cont])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
        ref = [logp[len(context) - 1 + t, tok].item() for t, tok in enumerate(cont)]
        assert isinstance(s, ChoiceScore) and len(s.token_logprobs) == len(cont)
        assert s.token_logprobs == pytest.approx(ref, abs=1e-4)
        assert s.logprob == pytest.approx(sum(ref), abs=1e-3)
        assert s.mean_logprob == pytest.approx(sum(ref) / len(cont), abs=1e-3)


def test_the_likely_continuation_wins():
    model = random_model(41)
    context = [3, 1, 4, 1, 5]
    with torch.no_grad():
        best = int(model(torch.tensor([context]))[0, -1].argmax())
        worst = int(model(torch.tensor([context]))[0, -1].argmin())
    s = score(model, context, [[worst], [best]])
    assert s[1].logprob > s[0].logprob


def test_bad_inputs_are_errors():
    model = random_model()
    with pytest.raises(ValueError, match="context is empty"):
        score(model, [], [[1]])
    with pytest.raises(ValueError, match="at least one token"):
        score(model, [1], [[2], []])
    with pytest.raises(ValueError, match="no continuations"):
        score(model, [1], [])
    with pytest.raises(ValueError, match=r"130 tokens, past the model's context of 128"):
        score(model, [1] * 120, [[2] * 10])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        score(model, [1], [[512]])
