"""Scoring continuations by likelihood: multiple choice the way GPT-3 evaluates few-shot tasks.

Instead of generating an answer and parsing it, ask the model how likely each candidate answer is
after the context: ``log P(choice | context) = sum_t log P(choice_t | context, choice_<t)``, read
off one forward pass per candidate (the logits at position ``t-1`` predict token ``t``). The
highest total wins; GPT-3 also reports the per-token mean, which favours neither short nor long
answers (:attr:`ChoiceScore.mean_logprob`).

All candidates run as one right-padded batch: padding after a sequence cannot change the logits of
the tokens before it (the attention is causal), so no attention mask is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcore.model.gpt import GPT


@dataclass
class ChoiceScore:
    logprob: float  # total log-probability of the continuation given the context
    token_logprobs: list[float]  # one per continuation token

    @property
    def mean_logprob(self) -> float:
        return self.logprob / len(self.token_logprobs)


@torch.inference_mode()
def score(model: GPT, context_ids: list[int], continuations: list[list[int]]) -> list[ChoiceScore]:
    """Log-probability of each continuation after ``context_ids`` (which must not be empty: GPT-2 has
    no start token, so use ``<|endoftext|>`` as the context of a document's first token)."""
    context_ids = list(context_ids)
    if not context_ids:
        raise ValueError("context is empty: give at least one token (e.g. <|endoftext|>)")
    if not continuations:
        raise ValueError("no continuations to score")
    if any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    ctx = model.config.block_size
    vocab = model.config.vocab_size
    longest = len(context_ids) + max(len(c) for c in continuations)
    if longest > ctx:
        raise ValueError(f"context ({len(context_ids)} tokens) + longest continuation = {longest} tokens, "
                         f"past the model's context of {ctx}")
    for t in context_ids + [t for c in continuations for t in c]:
        if not 0 <= t < vocab:
            raise ValueError(f"token {t} is outside the vocabulary [0, {vocab})")
    n_ctx = len(context_ids)
    batch = torch.zeros(len(continuations), longest, dtype=torch.long)  # right-padded with 0
    for i, c in enumerate(continuations):
        batch[i, : n_ctx + len(c)] = torch.tensor(context_ids + list(c))
    logits = model(batch.to(model.device))[:, n_ctx - 1 : longest - 1].float()  # (n, Tc, V) predicts cont
    logp = torch.log_softmax(logits, dim=-1)
    targets = batch[:, n_ctx:].to(model.device)  # (n, Tc)
    token_lp = logp.gather(-1, targets[..., None]).squeeze(-1).cpu()  # (n, Tc)
    out = []
    for i, c in enumerate(continuations):
        lps = token_lp[i, : len(c)].tolist()
        out.append(ChoiceScore(float(sum(lps)), lps))
    return out
