"""Prefix caching: reuse the keys and values of a prompt's beginning that another request computed.

Few-shot prompts repeat themselves: the instruction and the examples are the same for every query,
only the last lines differ. The keys and values of those shared tokens depend only on the tokens
before them (the model is causal), so once computed they can be reused by every later request that
starts with the same tokens, skipping most of its prefill.

This module is the *index* (no tensors): prompts are cut into blocks of ``block_size`` tokens, and
a block is identified by its tokens **and its parent block** (a chain, as in vLLM's automatic
prefix caching), so block 3 only matches when blocks 0-2 matched too. Each cached block lives in
one row of a preallocated pool (owned by the model runner); the index maps chain keys to pool rows
and evicts least-recently-used blocks (with their descendants, which become unreachable) when the
pool is full. Keys are compared exactly (the tokens themselves, not a hash), so a collision cannot
serve another prompt's keys.

Only *full* blocks are cached, and never a prompt's very last token: a request must compute at
least one token itself to get the logits it samples its first token from.

Keys and values also depend on the weights: requests served through different LoRA adapters of
one base model must not share blocks, so every chain starts from a ``namespace`` (the base model's
is -1, adapter ``i``'s is ``-2 - i``; pool rows are >= 0, so the two never collide).
"""

from __future__ import annotations

from collections import OrderedDict


class PrefixCache:
    """Chain-of-blocks index over a pool of ``num_blocks`` rows, LRU-evicted."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"prefix cache needs num_blocks >= 1 and block_size >= 1, "
                             f"got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._row_of: dict[tuple, int] = {}  # (parent row or -1, block tokens) -> pool row
        self._key_of: dict[int, tuple] = {}
        self._children: dict[int, set[int]] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low rows first
        self.queries = 0  # requests looked up
        self.hits = 0  # requests that reused at least one block
        self.hit_tokens = 0  # prompt tokens whose keys and values were reused

    def __len__(self) -> int:
        return len(self._row_of)

    def _blocks(self, tokens: list[int], limit: int):
        bs = self.block_size
        for j in range(limit // bs):
            yield j, tuple(tokens[j * bs:(j + 1) * bs])

    def match(self, tokens: list[int], namespace: int = -1) -> list[int]:
        """Pool rows of the longest cached chain of full blocks that starts ``tokens`` (counted as a
        query), leaving at least the last token uncached."""
        rows: list[int] = []
        parent = namespace
        for _, block in self._blocks(tokens, len(tokens) - 1):
            row = self._row_of.get((parent, block))
            if row is None:
                break
            rows.append(row)
            parent = row
        self._touch(rows)
        self.queries += 1
        if rows:
            self.hits += 1
            self.hit_tokens += len(rows) * self.block_size
        return rows

    def insert(self, tokens: list[int], num_tokens: int, namespace: int = -1) -> list[tuple[int, int]]:
        """Register the full blocks among the first ``num_tokens`` tokens (their keys and values
        are now computed). Returns ``(block_index, pool_row)`` for each block new to the cache:
        the caller copies those blocks' keys and values into those rows."""
        new: list[tuple[int, int]] = []
        parent = namespace
        path: list[int] = []
        for j, block in self._blocks(tokens, num_tokens):
            key = (parent, block)
            row = self._row_of.get(key)
            if row is None:
                row = self._allocate(protect=path)
                if row is None:  # the pool is smaller than this chain: cache what fits
                    break
                self._row_of[key] = row
                self._key_of[row] = key
                self._children.setdefault(parent, set()).add(row)
                new.append((j, row))
            path.append(row)
            parent = row
        self._touch(path)
        return new

    def _touch(self, chain: list[int]) -> None:
        # Leaves first, root last: the root becomes the most recently used, so eviction takes the
        # tails of chains (a query's last block) before the shared beginnings (the few-shot examples).
        for row in reversed(chain):
            self._lru[row] = None
            self._lru.move_to_end(row)

    def _allocate(self, protect: list[int]) -> int | None:
        if not self._free:
            victim = next((r for r in self._lru if r not in protect), None)
            if victim is None:
                return None
            self._evict(victim)
        return self._free.pop()

    def _evict(self, row: int) -> None:
        """Drop a block and its descendants (without their parent they can never match again)."""
        for child in list(self._children.pop(row, ())):
            self._evict(child)
        key = self._key_of.pop(row)
        del self._row_of[key]
        self._children.get(key[0], set()).discard(row)
        self._lru.pop(row, None)
        self._free.append(row)

    def clear(self) -> None:
        for row in list(self._key_of):
            if row in self._key_of:
                self._evict(row)
