"""Models for tests: random models, their transformers twins, reference decoders, tiny checkpoints.

Random GPT-2 weights at the usual 0.02 scale give almost flat next-token distributions, where two
candidates can sit within float rounding of each other; the helpers scale the weights up so the
models have clear preferences (as a trained model does), which keeps "same tokens" comparisons
about our code and not about the last bit of a float.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from lmcore.model import GPT, GPTConfig, save_pretrained

# Several shapes: heads of different widths, odd vocabularies, 1-3 layers.
SHAPES = {
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=512),
    "narrow-heads": dict(n_layer=3, n_head=6, n_embd=48, block_size=96, vocab_size=301),
    "one-head": dict(n_layer=1, n_head=1, n_embd=32, block_size=64, vocab_size=97),
}


def random_model(seed: int = 0, scale: float = 6.0, **shape) -> GPT:
    shape = shape or SHAPES["tiny"]
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**shape)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(scale)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
        model.transformer.ln_f.weight.mul_(5.0)  # logits several units apart: a peaked distribution
    return model


def to_transformers(model: GPT, tmp_path) -> transformers.GPT2LMHeadModel:
    """The same weights in transformers, through a real checkpoint on disk."""
    model.save_pretrained(tmp_path)
    return transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()


@torch.no_grad()
def greedy_without_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    """nanoGPT's loop: re-run the whole sequence for every new token (no KV cache)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def gpt2_vocab_model(seed: int = 0, **kw) -> GPT:
    """A tiny model over the real GPT-2 vocabulary, for tests that need text."""
    shape = dict(n_layer=2, n_head=2, n_embd=32, block_size=256, vocab_size=50257) | kw
    return random_model(seed, scale=4.0, **shape)


@torch.no_grad()
def hf_greedy(hf: transformers.GPT2LMHeadModel, prompt: list[int], n: int) -> list[int]:
    """transformers' ``generate(do_sample=False)``: exactly ``n`` new tokens (no end-of-text stop).

    The explicit all-ones attention mask matters: without it transformers infers one from
    ``pad_token_id`` and would mask every prompt token that happens to equal it.
    """
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def save_tiny_model(path: Path, seed: int, tokenizer, **overrides) -> Path:
    """A random tiny GPT (the tokenizer's vocabulary, 2 layers, 64 wide) saved with its tokenizer."""
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("tiny", **{"vocab_size": tokenizer.vocab_size, **overrides})
    save_pretrained(GPT(cfg), path, tokenizer=tokenizer)
    return path
