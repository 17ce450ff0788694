"""Looking inside a model on one text: its tokens, next-token probabilities, attention, logit lens.

The concepts of :mod:`lmcore.model.gpt`, made visible on a real input (one forward pass, no KV
cache, the same blocks the model runs):

* **Tokens**: the ids the tokenizer made, each with the bytes it stands for and where those bytes
  sit in the text (byte offsets: a token may hold half a UTF-8 character, so characters would lie).
* **Next-token probabilities**: at position ``t`` the logits are the model's guess for token
  ``t+1``; softmax turns them into probabilities. We keep the ``top_k`` most likely, and for the
  token that really came next its probability and its **rank** (1 = the model's first choice).
  Its **surprise** is ``-log2 p`` bits: 0 for a certain guess, 1 for a coin flip, ~15 for a token
  the model thought one in 30,000.
* **Attention**: in every layer each head's row ``t`` is a probability distribution over the
  positions ``0..t`` (the causal mask zeroes the rest): softmax(q_t . k_s / sqrt(head_dim)).
  Heads are independent, so each gets its own ``(T, T)`` matrix.
* **Logit lens** (nostalgebraist, 2020): the residual stream between blocks already lives in the
  space the output head reads. Putting it through the final LayerNorm and the (tied) head *early*
  shows what the model would predict if it stopped there: row 0 reads the embeddings (often the
  input token itself, through weight tying), the last row is the model's real prediction.

``inspect_tokens(model, ids, ...)`` does the work; :func:`token_pieces` gives the tokens' bytes and
offsets. Adapters work unchanged: the forward calls the model's own modules (LoRA-wrapped
projections included), so an engine's ``use_adapter`` context routes it through an adapter.
Memory: attention for ``L`` layers and ``H`` heads is ``L * H * T * T`` floats, kept only for the
layers and heads asked for; :func:`attention_bytes` says how much that is before anything runs.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch

from lmcore.tokenizer.bpe import Tokenizer

from .gpt import GPT

MAX_TOP_K = 50  # next-token alternatives per position: enough to see a distribution's shape


@dataclass(frozen=True)
class TokenPiece:
    """One token: its id, the bytes it stands for, ``text`` (those bytes shown safely: valid UTF-8
    as itself, any other byte as ``\\xNN``) and its byte span ``[start, end)`` in the text."""

    id: int
    piece: bytes
    text: str
    start: int
    end: int


@dataclass
class Inspection:
    """What :func:`inspect_tokens` saw. ``T`` tokens, ``k`` alternatives; tensors on the CPU.

    ``top_ids``/``top_probs`` ``(T, k)``: most likely next tokens after each position, most likely
    first. ``next_probs``/``next_ranks`` ``(T-1,)``: probability and rank (1 = top) of the token
    that actually came next. ``attention``: layer -> ``(len(heads), T, T)`` float32, rows summing
    to 1, zero above the diagonal. ``lens_ids``/``lens_probs`` ``(n_layer + 1, T)``: the logit
    lens' top token and its probability, row 0 = the embeddings, row ``l`` = after ``l`` blocks.
    """

    token_ids: list[int]
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    next_probs: torch.Tensor
    next_ranks: torch.Tensor
    layers: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    lens_ids: torch.Tensor | None = None
    lens_probs: torch.Tensor | None = None

    @property
    def surprise_bits(self) -> torch.Tensor:
        """``-log2 p`` of each actual next token, ``(T-1,)``."""
        return -torch.log2(self.next_probs.clamp_min(1e-30))


def show_bytes(piece: bytes) -> str:
    """Bytes as text a person can read: UTF-8 where it is valid, ``\\xNN`` for any other byte
    (a token holding half of ``é`` shows ``\\xc3``, never a replacement character)."""
    return piece.decode("utf-8", errors="backslashreplace")


def token_pieces(tokenizer: Tokenizer, ids: list[int]) -> list[TokenPiece]:
    """Each token's bytes and byte span in ``tokenizer.decode_bytes(ids)`` (the text's UTF-8, for
    ids that ``encode`` made). Ids past the tokenizer's vocabulary (a model may have a few more
    rows than its tokenizer) get no bytes and show as ``<id N>``."""
    out, at = [], 0
    for i in ids:
        try:
            piece = tokenizer.token_bytes(i)
            text = show_bytes(piece)
        except ValueError:
            piece, text = b"", f"<id {i}>"
        out.append(TokenPiece(i, piece, text, at, at + len(piece)))
        at += len(piece)
    return out


def check_selection(model: GPT, layers, heads, top_k: int) -> tuple[list[int], list[int]]:
    """The layers and heads to return (empty or None: all), checked; ValueError naming what is wrong."""
    cfg = model.config
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
    chosen = []
    for what, given, n in (("layer", layers, cfg.n_layer), ("head", heads, cfg.n_head)):
        picked = [operator.index(x) for x in given] if given else list(range(n))
        bad = [x for x in picked if not 0 <= x < n]
        if bad:
            raise ValueError(f"{what} {bad[0]} does not exist: this model has {n} {what}s, numbered 0..{n - 1}")
        if len(set(picked)) != len(picked):
            raise ValueError(f"{what}s {picked} name a {what} twice")
        chosen.append(picked)
    return chosen[0], chosen[1]


def attention_bytes(n_tokens: int, n_layers: int, n_heads: int, bytes_per_weight: int = 2) -> int:
    """Size of the attention weights of ``n_layers`` x ``n_heads`` heads over ``n_tokens``
    (float16 by default: what a service sends). Grows with the square of the text's length."""
    return n_layers * n_heads * n_tokens * n_tokens * bytes_per_weight


def check_tokens(model: GPT, ids) -> list[int]:
    """``ids`` as a list of ints, non-empty, in the vocabulary and within the context."""
    try:
        ids = [operator.index(t) for t in ids]
    except TypeError:
        raise ValueError("token_ids must be integer token ids") from None
    cfg = model.config
    if not ids:
        raise ValueError("nothing to inspect: give a text or at least one token id")
    if len(ids) > cfg.block_size:
        raise ValueError(f"{len(ids)} tokens is longer than the model's context of {cfg.block_size}: "
                         "inspect a shorter text")
    bad = next((t for t in ids if not 0 <= t < cfg.vocab_size), None)
    if bad is not None:
        raise ValueError(f"token {bad} is outside the vocabulary: this model's ids are 0..{cfg.vocab_size - 1}")
    return ids


def causal_attention(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention sub-block with its weights in the open: ``(output (B, T, C), probs (B, nh, T, T))``.

    Same maths as :meth:`CausalSelfAttention.forward`, whose fused kernel never materialises the
    weights: ``softmax(q k^T / sqrt(hs))`` with the future masked, then the weighted sum of values.
    """
    q, k, v = attn.split_heads(x)  # 3 x (B, nh, T, hs)
    T = q.size(2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)  # rows sum to 1 over 0..t
    return attn.merge_heads(probs @ v), probs  # (B, nh, T, hs) -> (B, T, C)


@torch.inference_mode()
def inspect_tokens(model: GPT, ids, top_k: int = 5, layers=None, heads=None, attention: bool = True,
                   logit_lens: bool = True) -> Inspection:
    """Run ``model`` once over ``ids`` and keep what a person wants to see (see the module docstring).

    ``layers``/``heads``: which attention weights to keep (None or empty: all); ``attention=False``
    keeps none, ``logit_lens=False`` skips the lens. ValueError for bad ids, layers, heads or top_k.
    """
    ids = check_tokens(model, ids)
    layers, heads = check_selection(model, layers, heads, top_k)
    wanted = set(layers) if attention else set()
    head_index = torch.tensor(heads)
    tr = model.transformer
    idx = torch.tensor([ids], device=model.device)  # (1, T)
    x = model.embed(idx, torch.arange(len(ids), device=model.device))  # (1, T, C)
    residuals = [x]  # the residual stream before block 0, after block 0, ... (for the lens)
    kept: dict[int, torch.Tensor] = {}
    for i, block in enumerate(tr.h):
        h = block.ln_1(x)
        if i in wanted:
            y, probs = causal_attention(block.attn, h)
            kept[i] = probs[0].index_select(0, head_index.to(probs.device)).float().cpu()  # (H, T, T)
        else:
            y = block.attn(h)
        x = x + y
        x = x + block.mlp(block.ln_2(x))
        residuals.append(x)
    logits = model.lm_head(tr.ln_f(x))[0].float()  # (T, V)
    probs = logits.softmax(-1)
    top_probs, top_ids = probs.topk(top_k, dim=-1)  # (T, k)
    nxt = idx[0, 1:]  # (T-1,) the tokens that came next
    next_probs = probs[:-1].gather(1, nxt[:, None]).squeeze(1)  # (T-1,)
    next_ranks = (probs[:-1] > next_probs[:, None]).sum(-1) + 1  # 1 = the model's first choice
    out = Inspection(ids, top_ids.cpu(), top_probs.cpu(), next_probs.cpu(), next_ranks.cpu(),
                     [k for k in layers if k in kept], heads if attention else [], kept)
    if logit_lens:
        lens = [model.lm_head(tr.ln_f(r))[0].float().softmax(-1).max(-1) for r in residuals]  # (T,) each
        out.lens_probs = torch.stack([p for p, _ in lens]).cpu()  # (n_layer + 1, T)
        out.lens_ids = torch.stack([i for _, i in lens]).cpu()
    return out


__all__ = ["MAX_TOP_K", "Inspection", "TokenPiece", "attention_bytes", "causal_attention", "check_selection",
           "check_tokens", "inspect_tokens", "show_bytes", "token_pieces"]
