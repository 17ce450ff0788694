"""The GPT-2 model: token + position embeddings, a stack of transformer blocks, tied output head.

Reading guide (the concepts from the seed reading list, where they live):

* **Tokenization** turns text into integer ids (``lmcore.tokenizer``); the model only sees ids.
* **Embeddings**: ``wte`` maps each id to a learned ``n_embd``-wide vector, ``wpe`` adds a learned
  vector per position (GPT-2 has no sinusoids: positions are learned like words).
* **Attention**: every token builds a query, a key and a value; the query-key dot products say how
  much each earlier token matters, and the softmax-weighted sum of values updates the token. A
  causal mask keeps token t from seeing tokens after t (a decoder predicts the future, so it must
  not read it).
* **Heads**: the ``n_embd`` channels are split into ``n_head`` independent attention heads of
  ``head_dim`` channels, each free to learn a different relation (syntax, coreference, copying).
* **Feed-forward network**: a 2-layer MLP (4x wider, GELU) applied to every position on its own.
* **Transformer block**: attention then MLP, each wrapped as ``x + f(LayerNorm(x))`` (pre-LN, as
  GPT-2 moved the LayerNorm to the input of each sub-block), and a final LayerNorm at the top.
* **Logits**: the final vectors are projected onto the vocabulary: one raw score per token id;
  softmax turns them into next-token probabilities.
* **Weight tying**: that output projection *is* the input embedding matrix (``lm_head.weight is
  wte.weight``): a token's vector is used both to read it and to predict it, saving
  ``vocab_size * n_embd`` parameters (38M of GPT-2 small's 124M).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmcore._io import has_tokenizer_files
from lmcore.tokenizer.bpe import Tokenizer

from .checkpoint import read_checkpoint, write_checkpoint
from .config import GPTConfig
from .kv_cache import CacheBatch


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; one fused Linear makes q, k and v for all heads."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C)
        q, k, v = qkv.split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        return q, k, v

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_embd)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        # softmax(q k^T / sqrt(hs)) v, with the causal mask; SDPA picks a fused kernel.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        return self.merge_heads(y)


def cached_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     batch: CacheBatch) -> torch.Tensor:
    """Causal attention for a flat batch of tokens, reading and extending the KV cache.

    ``qkv``: ``(N, 3, nh, hs)`` queries, keys and values of the step's ``N`` tokens, laid out as
    ``batch.num_decode`` decode tokens then prefill segments (:class:`lmcore.model.kv_cache.CacheBatch`).
    Each token's key and value are written at its (slot, position) first, so every token attends to
    the cached past *and* itself. Returns the heads' outputs side by side, ``(N, nh * hs)``.
    """
    N, _, nh, hs = qkv.shape
    # One indexed copy per buffer writes all N tokens: rows of the flattened (slot, head, pos) cache.
    k_cache.view(-1, hs).index_copy_(0, batch.write_index, qkv[:, 1].reshape(N * nh, hs))
    v_cache.view(-1, hs).index_copy_(0, batch.write_index, qkv[:, 2].reshape(N * nh, hs))
    q = qkv[:, 0]  # (N, nh, hs)
    parts = []
    D = batch.num_decode
    if D:
        qd = q[:D].unsqueeze(2)  # (D, nh, 1, hs): each decode token is its own sequence
        if batch.decode_index is not None:  # holes in the slot range: scatter into dummy rows
            qd = qd.new_zeros(batch.decode_hi - batch.decode_lo, nh, 1, hs).index_copy_(0, batch.decode_index, qd)
        keys = k_cache[batch.decode_lo:batch.decode_hi, :, :batch.decode_len]  # (R, nh, L, hs): a view
        values = v_cache[batch.decode_lo:batch.decode_hi, :, :batch.decode_len]
        yd = F.scaled_dot_product_attention(qd, keys, values, attn_mask=batch.decode_mask)
        if batch.decode_index is not None:
            yd = yd.index_select(0, batch.decode_index)
        parts.append(yd.view(D, nh * hs))  # (D, nh, 1, hs) -> (D, C): heads side by side
    for seg in batch.prefill:
        T, end = seg.row_end - seg.row_start, seg.start_pos + seg.row_end - seg.row_start
        qs = q[seg.row_start:seg.row_end].transpose(0, 1).unsqueeze(0)  # (1, nh, T, hs)
        keys = k_cache[seg.slot:seg.slot + 1, :, :end]  # (1, nh, start+T, hs)
        values = v_cache[seg.slot:seg.slot + 1, :, :end]
        # A segment that starts its sequence is plainly causal; a later chunk also sees the past.
        ys = F.scaled_dot_product_attention(qs, keys, values, attn_mask=seg.mask, is_causal=seg.mask is None)
        parts.append(ys[0].transpose(0, 1).reshape(T, nh * hs))  # (1, nh, T, hs) -> (T, C)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # (N, C)


class MLP(nn.Module):
    """Position-wise feed-forward network: n_embd -> 4*n_embd -> GELU(tanh) -> n_embd."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 used the tanh approximation of GELU ("gelu_new" in transformers); exact erf GELU
        # differs by ~1e-3 and would break logit parity.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2: ``forward(idx)`` maps token ids ``(B, T)`` to next-token logits ``(B, T, vocab_size)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # Set by load_model from the checkpoint directory; save_pretrained writes it back beside the weights.
        self.tokenizer: Tokenizer | None = None
        self.name_or_path: str | None = None  # the directory it was loaded from
        self.quantization: str | None = None  # "int8" once lmcore.model.quantize has run (None: as loaded)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: one Parameter, two uses (embedding lookup in, logits projection out).
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: residual projections shrink by 1/sqrt(2*n_layer) so the residual
        # stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; the tied head is counted once (it is the same tensor as wte)."""
        n = sum(p.numel() for p in self.parameters())
        if self.quantization is not None:  # int8 weights are buffers; the head's copy is the tied wte
            from .quantize import Int8Linear

            n += sum(m.weight_int8.numel() for m in self.modules() if isinstance(m, Int8Linear) and m is not self.lm_head)
        if exclude_embeddings:
            n -= self.transformer.wpe.weight.numel()
        return n

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings: idx (B, T), pos (T,) or (B, T) -> (B, T, C)."""
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(idx))  # (B, T, vocab_size)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final (layer-normed) hidden states ``(B, T, C)`` of ``idx (B, T)``: :meth:`forward`
        without the output projection, for callers that project only some positions (scoring)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence of {T} tokens is longer than the model's context of {self.config.block_size}"
            )
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.embed(idx, pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)  # (B, T, C)

    def decode_layers(self) -> list[tuple]:
        """Per block: ``(ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj)``, the pieces
        :meth:`forward_cached` calls. Fetched once per engine (module attribute lookups cost a
        microsecond each, ~60 per step); an engine may swap a Linear for a re-laid-out copy."""
        return [(b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.c_proj) for b in self.transformer.h]

    def forward_cached(self, idx: torch.Tensor, batch: CacheBatch, k_cache, v_cache,
                       layers: list[tuple] | None = None) -> torch.Tensor:
        """Final hidden states ``(N, C)`` of a flat batch of tokens ``idx (N,)``, using the KV cache.

        The inference twin of :meth:`forward` (no dropout): the same blocks, but each token attends
        to its own sequence's cached keys and values instead of recomputing them. ``k_cache,
        v_cache``: ``(n_layer, n_slots, nh, max_seq, hs)`` or per-layer lists of
        ``(n_slots, nh, max_seq, hs)``; ``layers``: :meth:`decode_layers` or an engine's version
        of it. Returns hidden states, not logits: the caller projects only the rows it samples from
        (nanoGPT's "only forward the lm_head on the very last position"), the largest single cost
        of a step on a 50k vocabulary.
        """
        cfg = self.config
        N = idx.size(0)
        x = self.transformer.wte(idx) + self.transformer.wpe(batch.positions)  # (N, C)
        layers = layers or self.decode_layers()
        for (ln_1, c_attn, c_proj, ln_2, c_fc, fc_proj), kc, vc in zip(layers, k_cache, v_cache):
            h = F.layer_norm(x, ln_1.normalized_shape, ln_1.weight, ln_1.bias, ln_1.eps)
            qkv = c_attn(h).view(N, 3, cfg.n_head, cfg.head_dim)  # (N, 3, nh, hs)
            x = x + c_proj(cached_attention(qkv, kc, vc, batch))
            h = F.layer_norm(x, ln_2.normalized_shape, ln_2.weight, ln_2.bias, ln_2.eps)
            x = x + fc_proj(F.gelu(c_fc(h), approximate="tanh"))  # the MLP, as in MLP.forward
        ln_f = self.transformer.ln_f
        return F.layer_norm(x, ln_f.normalized_shape, ln_f.weight, ln_f.bias, ln_f.eps)  # (N, C)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy; positions whose target is ``ignore_index`` do not count."""
        logits = self(idx)  # (B, T, V)
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index
        )

    # --- checkpoint I/O (the file format lives in lmcore.model.checkpoint) ---------------------
    def save_pretrained(self, path: str | Path, tokenizer: Tokenizer | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` in Hugging Face's GPT-2 layout, and the
        tokenizer (``tokenizer`` or :attr:`tokenizer`) beside them."""
        save_pretrained(self, path, tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device="cpu") -> GPT:
        """Load a checkpoint directory (see :func:`load_model`)."""
        return load_model(path, dtype=dtype, device=device)


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               quantize: str | None = None) -> GPT:
    """Load a GPT-2 checkpoint directory (Hugging Face layout) into an lmcore ``GPT`` in eval mode.

    ``dtype=None`` keeps the checkpoint's own dtype. When the directory also holds tokenizer files
    the tokenizer is loaded as ``model.tokenizer`` (``None`` otherwise). ``quantize="int8"``
    quantizes the Linear weights at load (CPU, fp32 only; see :mod:`lmcore.model.quantize`).
    """
    from .quantize import QUANTIZATIONS

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {list(QUANTIZATIONS)} or None (fp32)")
    config, state = read_checkpoint(path)
    src_dtype = state["transformer.wte.weight"].dtype
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # re-tie: assign=True replaced the Parameter
    model = model.to(device=device, dtype=dtype or src_dtype)
    model.eval()
    model.tokenizer = Tokenizer.from_file(path) if has_tokenizer_files(path) else None
    model.name_or_path = str(path)
    if quantize == "int8":
        from .quantize import quantize_int8

        quantize_int8(model if dtype is not None else model.float())
    return model


def save_pretrained(model: GPT, path: str | Path, tokenizer: Tokenizer | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads.

    The tokenizer (``tokenizer`` or the model's own ``model.tokenizer``) is saved beside them.
    Every file is written atomically, so a crash never leaves a half-written model.
    """
    if model.quantization is not None:
        raise ValueError(f"this model's weights are {model.quantization} (quantized at load): save the "
                         "fp32 model it was loaded from; quantization is applied again at load")
    write_checkpoint(path, model.config, model.state_dict())
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is not None:
        tokenizer.save(path)
