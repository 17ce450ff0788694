"""Scoring continuations by likelihood: multiple choice the way GPT-3 evaluates few-shot tasks.

Instead of generating an answer and parsing it, ask the model how likely each candidate answer is
after the context: ``log P(choice | context) = sum_t log P(choice_t | context, choice_<t)``, read
off one forward pass per candidate (the logits at position ``t-1`` predict token ``t``). The
highest total wins; GPT-3 also reports the per-token mean, which favours neither short nor long
answers (:attr:`ChoiceScore.mean_logprob`).

Memory is O(tokens), never O(tokens x vocabulary): candidates run in right-padded groups of at
most ``max_batch_tokens`` tokens (padding after a sequence cannot change the logits of the tokens
before it, the attention being causal, so no mask is needed), and only the positions that predict
a continuation token are projected onto the vocabulary, ``chunk_rows`` at a time, each chunk
reduced at once to the log-probability of its target. 64 choices of 250 tokens on GPT-2's 50k
vocabulary would be ~3 GiB of logits at once; here they are at most ``chunk_rows x vocab``.
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
def score(model: GPT, context_ids: list[int], continuations: list[list[int]], max_batch_tokens: int = 2048,
          chunk_rows: int = 256) -> list[ChoiceScore]:
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
    n_ctx = len(context_ids)
    longest = n_ctx + max(len(c) for c in continuations)
    if longest > ctx:
        raise ValueError(f"context ({n_ctx} tokens) + longest continuation = {longest} tokens, "
                         f"past the model's context of {ctx}")
    for t in context_ids + [t for c in continuations for t in c]:
        if not 0 <= t < vocab:
            raise ValueError(f"token {t} is outside the vocabulary [0, {vocab})")
    out: list[ChoiceScore | None] = [None] * len(continuations)
    for group in _groups(continuations, n_ctx, max_batch_tokens):
        conts = [continuations[i] for i in group]
        T = n_ctx + max(len(c) for c in conts)
        batch = torch.zeros(len(conts), T, dtype=torch.long)  # right-padded with 0
        rows, targets = [], []
        for b, c in enumerate(conts):
            batch[b, : n_ctx + len(c)] = torch.tensor(context_ids + list(c))
            rows.extend(range(b * T + n_ctx - 1, b * T + n_ctx - 1 + len(c)))  # position t-1 predicts t
            targets.extend(c)
        hidden = model.hidden_states(batch.to(model.device)).flatten(0, 1)  # (G*T, C)
        hidden = hidden.index_select(0, torch.tensor(rows, device=hidden.device))  # (R, C): needed rows only
        target_t = torch.tensor(targets, device=hidden.device)
        token_lp = torch.cat([_target_logprobs(model, hidden[i:i + chunk_rows], target_t[i:i + chunk_rows])
                              for i in range(0, len(rows), chunk_rows)]).tolist()
        at = 0
        for i, c in zip(group, conts):
            lps = token_lp[at:at + len(c)]
            at += len(c)
            out[i] = ChoiceScore(float(sum(lps)), lps)
    return out


def _groups(continuations: list[list[int]], n_ctx: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices of the continuations in groups whose padded batch stays within ``max_batch_tokens``
    (a single candidate longer than that runs alone); similar lengths together, to pad little."""
    order = sorted(range(len(continuations)), key=lambda i: len(continuations[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            g = groups[-1]
            width = n_ctx + len(continuations[i])  # the longest so far: sorted ascending
            if (len(g) + 1) * width <= max_batch_tokens:
                g.append(i)
                continue
        groups.append([i])
    return groups


def _target_logprobs(model: GPT, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(hidden @ W_out)[target]`` per row: one ``(rows, V)`` block at a time."""
    logits = model.lm_head(hidden).float()  # (rows, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
