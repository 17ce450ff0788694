"""The scheduler: which sequences run in the next step, and how many of their tokens. No model here.

Iteration-level scheduling (Orca, vLLM): the batch is re-formed at *every* step. A sequence joins
as soon as a slot is free and leaves the moment it finishes or is aborted, instead of the whole
batch waiting for its slowest member.

Contract of :meth:`Scheduler.schedule` (one call per engine step):

1. every running sequence whose prompt is fully computed **decodes** one token (in slot order);
2. sequences still **prefilling** get the next chunk of their prompt, oldest first, from a budget
   of ``prefill_chunk_size`` prompt tokens per step (chunked prefill: a 1,000-token prompt is
   spread over several steps, and every step still decodes everyone else);
3. while budget and free slots remain, waiting sequences are **admitted** first-come first-served,
   each into the lowest free slot; a prefix matcher may declare some of the prompt already cached,
   so its prefill starts later.

So a step runs at most ``max_slots`` decode tokens plus ``prefill_chunk_size`` prompt tokens, and a
running stream never waits more than one step for a token, whatever arrives. After the model ran,
:meth:`Scheduler.advance` records what was computed; :meth:`finish` and :meth:`abort` free a slot
immediately, so the very next ``schedule()`` can hand it to a waiting sequence.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """The scheduler's view of a request: token counts and a slot."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int = -1
    num_computed: int = 0  # tokens whose keys and values are in the cache
    num_cached_prefix: int = 0  # of those, tokens reused from the prefix cache at admission
    prefix_rows: Any = None  # the prefix matcher's handle (pool rows), for the runner to copy in
    arrival: int = 0
    adapter: int = -1  # LoRA adapter index in the model's bank; -1 = the base model

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.prompt_len

    def next_input(self) -> int:
        """The token a decode step feeds: the last one sampled."""
        return self.output_ids[-1]


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int  # first prompt position computed this step
    end: int  # one past the last

    @property
    def completes_prompt(self) -> bool:
        return self.end == self.seq.prompt_len


@dataclass
class VerifyChunk:
    """A speculating sequence's step (see :mod:`lmcore.engine.speculative`): its last sampled token
    and ``draft`` proposed tokens, fed at positions ``seq.num_computed ...``, every row sampled."""

    seq: Sequence
    draft: list[int]
    draft_probs: Any = None  # (len(draft), V) the draft model's probabilities; None: a point proposal

    @property
    def tokens(self) -> list[int]:
        return [self.seq.next_input()] + self.draft


@dataclass
class SchedulerOutput:
    decode: list[Sequence]  # one token each, ascending slot
    prefill: list[PrefillChunk]
    admitted: list[Sequence]  # given a slot this step (their cached prefix must be copied in first)
    verify: list[VerifyChunk] = field(default_factory=list)  # speculating sequences (the engine moves them here)

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill and not self.verify

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(c.end - c.start for c in self.prefill) + sum(len(v.tokens) for v in self.verify)


PrefixMatcher = Callable[[Sequence], tuple[int, Any]]  # sequence -> (cached prompt tokens, handle)


class Scheduler:
    def __init__(self, max_slots: int, prefill_chunk_size: int, prefix_matcher: PrefixMatcher | None = None):
        if max_slots < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_slots}")
        if prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {prefill_chunk_size}")
        self.max_slots = max_slots
        self.prefill_chunk_size = prefill_chunk_size
        self.prefix_matcher = prefix_matcher
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._free_slots = list(range(max_slots))  # a heap: lowest slot first keeps the batch dense
        self._by_id: dict[str, Sequence] = {}
        self._arrivals = 0

    # --- queue -----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        seq.arrival = self._arrivals
        self._arrivals += 1
        self.waiting.append(seq)
        self._by_id[seq.request_id] = seq

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        decode = sorted((s for s in self.running if not s.is_prefilling), key=lambda s: s.slot)
        prefill: list[PrefillChunk] = []
        budget = self.prefill_chunk_size
        for seq in self.running:
            if budget == 0:
                break
            if seq.is_prefilling:
                n = min(seq.prompt_len - seq.num_computed, budget)
                prefill.append(PrefillChunk(seq, seq.num_computed, seq.num_computed + n))
                budget -= n
        admitted: list[Sequence] = []
        while budget > 0 and self.waiting and self._free_slots:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self._free_slots)
            seq.status = SequenceStatus.RUNNING
            if self.prefix_matcher is not None:
                seq.num_cached_prefix, seq.prefix_rows = self.prefix_matcher(seq)
                seq.num_computed = seq.num_cached_prefix
            self.running.append(seq)
            admitted.append(seq)
            n = min(seq.prompt_len - seq.num_computed, budget)
            prefill.append(PrefillChunk(seq, seq.num_computed, seq.num_computed + n))
            budget -= n
        return SchedulerOutput(decode, prefill, admitted)

    def advance(self, out: SchedulerOutput) -> None:
        """Record that the step's tokens now have keys and values in the cache."""
        for seq in out.decode:
            seq.num_computed += 1
        for chunk in out.prefill:
            chunk.seq.num_computed = chunk.end

    def accept(self, seq: Sequence, n_tokens: int) -> None:
        """A verify step kept ``n_tokens`` of its tokens' keys and values (the last sampled token and
        the accepted draft): the cache past them is stale and is overwritten by later steps."""
        seq.num_computed += n_tokens

    # --- leaving ---------------------------------------------------------------------------------
    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) and free its slot for the next step."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            heapq.heappush(self._free_slots, seq.slot)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self._by_id.pop(seq.request_id, None)

    def abort(self, request_id: str) -> Sequence | None:
        seq = self._by_id.get(request_id)
        if seq is not None:
            self.finish(seq)
        return seq
