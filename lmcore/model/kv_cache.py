"""The KV cache: keys and values of tokens already seen, so decoding never recomputes the past.

In a decoder, token t's attention reads the keys and values of tokens 0..t. Those never change once
computed (the model is causal), so a generator computes them once and keeps them: after the prompt
is **prefilled**, each **decode** step feeds one new token per sequence, writes its key and value,
and attends over the cached ones. Without the cache, step t would redo t tokens of work.

Layout: two preallocated buffers per model, ``k`` and ``v`` of shape
``(n_layer, n_slots, n_head, max_seq_len, head_dim)``, kept out of any state dict. A running
sequence owns one **slot** (a row) for its lifetime and writes position ``p`` at ``[:, slot, :, p]``.

Why per-slot contiguous and not paged blocks (vLLM's PagedAttention): attention then reads a plain
strided *view* of the cache (``k[layer, lo:hi, :, :L]``) and feeds it to PyTorch's fused
scaled-dot-product attention with no gather, on any device. Paging saves memory when sequence
lengths vary wildly, but without a paged-attention kernel it costs a gather of every sequence's
keys and values at every layer and step, which on a CPU is as much memory traffic as the weights.
The price is reserved memory: ``n_slots * max_seq_len`` positions whether used or not (the engine
lets you cap ``max_seq_len`` below the model's context; :meth:`KVCache.nbytes` reports it).
Shared prompt prefixes are handled by :mod:`lmcore.engine.prefix_cache`: their keys and values are copied
into a slot from a pool of blocks (a memcpy, far cheaper than recomputing them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """Keys and values for ``n_slots`` sequences of up to ``max_seq_len`` tokens."""

    def __init__(self, n_layer: int, n_slots: int, n_head: int, max_seq_len: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, n_slots, n_head, max_seq_len, head_dim)
        # Zeros, not empty: attention may read (and mask out) positions never written, and a NaN
        # from uninitialised memory would survive masking (0 * NaN = NaN).
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_slots = n_slots
        self.max_seq_len = max_seq_len

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class BlockPool:
    """Keys and values of cached prompt blocks (for :mod:`lmcore.engine.prefix_cache`), copied in and out of
    slots: ``k, v`` of shape ``(num_blocks, n_layer, n_head, block_size, head_dim)``."""

    def __init__(self, num_blocks: int, block_size: int, n_layer: int, n_head: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (num_blocks, n_layer, n_head, block_size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size

    def load(self, cache: KVCache, slot: int, rows: list[int]) -> None:
        """Copy pool rows, laid end to end, into positions ``[0, len(rows) * block_size)`` of a slot.

        One strided copy per run of consecutive pool rows (a chain inserted in one go occupies
        consecutive rows), straight from the pool into the slot: no gathered temporary. Profiled
        on a 960-token GPT-2-small prefix, the old gather (``index_select`` + a reshape copy +
        the assignment: three passes over 70 MB) took 534 ms of a 609 ms cached first token;
        this single pass is a memcpy-speed ~10-20 ms, leaving the suffix's forward pass as the cost.
        """
        self._copy(cache, slot, list(enumerate(rows)), to_slot=True)

    def save(self, cache: KVCache, slot: int, blocks: list[tuple[int, int]]) -> None:
        """Copy the slot's prompt blocks ``(block_index, pool_row)`` into the pool."""
        self._copy(cache, slot, blocks, to_slot=False)

    def _copy(self, cache: KVCache, slot: int, blocks: list[tuple[int, int]], to_slot: bool) -> None:
        bs = self.block_size
        for j, row, n in _runs(blocks):
            for pool, buf in ((self.k, cache.k), (self.v, cache.v)):
                L, _, nh, _, hd = buf.shape
                in_pool = pool[row:row + n].permute(1, 2, 0, 3, 4)  # (L, nh, n, bs, hd): a view
                in_slot = buf[:, slot, :, j * bs:(j + n) * bs].view(L, nh, n, bs, hd)  # a view too
                (in_slot if to_slot else in_pool).copy_(in_pool if to_slot else in_slot)


def _runs(blocks: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(block_index, pool_row)`` pairs -> ``(first block, first row, length)`` runs where both
    the block indices and the pool rows are consecutive."""
    runs: list[list[int]] = []
    for j, row in blocks:
        if runs and runs[-1][0] + runs[-1][2] == j and runs[-1][1] + runs[-1][2] == row:
            runs[-1][2] += 1
        else:
            runs.append([j, row, 1])
    return [tuple(r) for r in runs]


@dataclass
class PrefillSegment:
    """A run of consecutive prompt tokens of one sequence inside the step's flat token batch."""

    row_start: int  # first row in the flat batch
    row_end: int  # one past the last row
    slot: int
    start_pos: int  # position of the first token (tokens before it are already cached)
    mask: torch.Tensor | None  # (T, start_pos+T) bool, True = may attend; None = plain causal


def segment_mask(start: int, end: int, device) -> torch.Tensor | None:
    """A :class:`PrefillSegment`'s mask for positions ``start..end-1``: query ``i`` (at position
    ``start + i``) sees keys ``0..start + i``. None for a segment from position 0 (plainly causal)."""
    if start == 0:
        return None
    return torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None]


def decode_mask(row_pos: torch.Tensor, L: int, dtype: torch.dtype) -> torch.Tensor:
    """``CacheBatch.decode_mask`` ``(rows, 1, 1, L)``, additive: row ``i`` sees keys ``0..row_pos[i]``.
    Float (0 or -inf), not bool: SDPA's CPU kernel ran ~30% faster with it."""
    visible = torch.arange(L, device=row_pos.device)[None, :] <= row_pos[:, None]  # (rows, L)
    mask = torch.zeros(visible.shape, device=row_pos.device, dtype=dtype).masked_fill_(~visible, float("-inf"))
    return mask[:, None, None, :]


@dataclass
class CacheBatch:
    """Where one step's tokens go in the cache and what each attends to.

    The step's tokens are laid out flat, ``N`` rows: first ``num_decode`` decode tokens (one per
    sequence, in ascending slot order), then the prefill segments. Every Linear runs once over all
    ``N`` rows (the weights are read once per step, whatever the mix); only attention is split.

    Decode attention runs batched over the slot range ``[decode_lo, decode_hi)``: row ``i`` of that
    range attends to positions ``<= decode_pos`` through ``decode_mask``. When the decode slots have
    holes (a slot that is free or still prefilling), ``decode_index`` maps decode rows into the
    range; the holes get a dummy query whose output is dropped. Without holes it is ``None``.
    """

    slots: torch.Tensor  # (N,) long: slot of every row
    positions: torch.Tensor  # (N,) long: position of every row
    write_index: torch.Tensor  # (N * nh,) long: rows of the cache viewed as (slots*nh*max_seq, hs)
    num_decode: int
    decode_lo: int = 0
    decode_hi: int = 0
    decode_len: int = 0  # keys read by decode attention: max decode position + 1
    decode_mask: torch.Tensor | None = None  # (decode_hi-decode_lo, 1, 1, decode_len) additive (0 / -inf)
    decode_index: torch.Tensor | None = None  # (num_decode,) long rows within the range, or None
    prefill: tuple[PrefillSegment, ...] = ()
