"""What the engine tells a monitor: one record per step and one per finished request.

The engine knows nothing of Prometheus. A service that wants metrics hands the engine a
:class:`StatsListener` (``Engine.set_stats_listener``); the engine then calls

* ``on_step(StepStats)`` at the end of every :meth:`~lmcore.engine.Engine.step` that ran the model:
  how many sequences were in the batch, how many decode and prompt tokens it computed, how long
  the step took (scheduling, the forward pass, sampling and the bookkeeping after it);
* ``on_request_finished(RequestStats)`` once per request, when it finishes (``length``, ``eos``,
  ``stop``), is aborted (``aborted``: a client cancel, a deadline) or fails alone (``error``: its
  row broke the step, see :mod:`lmcore.engine.confinement`).

A request's life is split as vLLM splits it, on the engine's own clock (``time.perf_counter``)::

    arrival --queue--> admitted (given a KV-cache slot) --prefill--> first token --decode--> finish

so ``queue_s`` is time spent waiting for a slot, ``prefill_s`` the prompt's computation (chunked
over several steps for a long prompt, shortened by prefix-cache hits) and ``decode_s`` the
generation after the first token. A phase the request never reached is ``None`` (a request
aborted while queued has no prefill time). Both callbacks run on the thread that steps the engine,
between steps' work, so they must be cheap (a few counter increments) and must not block.

Gauges (slots and KV-cache positions in use, prefix-cache counters) are not pushed: a monitor reads
them whenever it likes from :meth:`~lmcore.engine.Engine.stats`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

FINISH_REASONS = ("length", "eos", "stop", "aborted", "error")


@dataclass(frozen=True)
class StepStats:
    batch_size: int  # sequences that ran in the step (decoding + prefilling)
    decode_tokens: int
    prefill_tokens: int
    duration_s: float


@dataclass(frozen=True)
class RequestStats:
    request_id: str
    adapter: str | None  # the LoRA adapter the request named; None: the base model
    finish_reason: str  # one of FINISH_REASONS
    prompt_tokens: int
    cached_prompt_tokens: int  # of those, reused from the prefix cache
    completion_tokens: int
    queue_s: float | None  # arrival -> admitted into a slot
    prefill_s: float | None  # admitted -> first generated token
    decode_s: float | None  # first generated token -> finished


class StatsListener(Protocol):
    def on_step(self, stats: StepStats) -> None: ...

    def on_request_finished(self, stats: RequestStats) -> None: ...


class RequestClock:
    """The three instants of a request's life the engine records (``perf_counter`` seconds)."""

    __slots__ = ("arrival", "admitted", "first_token")

    def __init__(self):
        self.arrival = time.perf_counter()
        self.admitted: float | None = None
        self.first_token: float | None = None

    def finished(self, request_id: str, adapter: str | None, reason: str, prompt_tokens: int,
                 cached_prompt_tokens: int, completion_tokens: int) -> RequestStats:
        end = time.perf_counter()
        queue = (self.admitted - self.arrival) if self.admitted is not None else None
        prefill = decode = None
        if self.first_token is not None:
            prefill = self.first_token - self.admitted
            decode = end - self.first_token
        elif self.admitted is not None:
            prefill = end - self.admitted  # aborted mid-prefill: the time it spent there
        return RequestStats(request_id, adapter, reason, prompt_tokens, cached_prompt_tokens, completion_tokens,
                            queue, prefill, decode)
