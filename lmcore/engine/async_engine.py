"""AsyncEngine: the Engine driven by one background thread, streamed to asyncio tasks.

The model runs in a single background thread that calls ``engine.step()`` while there is work and
sleeps on an event when there is none; asyncio tasks never block on the model. Each request gets
its own output queue (vLLM's pattern: one producer, a queue per consumer); after each step the step
thread hands that step's outputs to their queues with **one** ``loop.call_soon_threadsafe`` per event
loop (not one per output: each such call writes to the loop's wake-up pipe). Several tasks may
stream concurrently, from one or several event loops.

Coalescing: a consumer takes *everything* queued for its request at once. When it keeps up, that is
one step's output, delivered as soon as the step ends (no batching delay). When it falls behind (a
busy event loop, a slow network write), the outputs queued meanwhile come as one merged
:class:`StepOutput` (:func:`merge_outputs`: tokens, text and log-probabilities concatenated, finish
and counts from the last), so a lagging stream costs one message per catch-up instead of one per
token, and it catches up instead of falling further behind. Text stays whole UTF-8 characters,
since every step's text is.

Locking: one lock guards the engine; the step thread holds it for a whole ``step()``, and
``add_request``/``abort`` take it too, so they land *between* steps. The event loop never waits
for that lock: ``stream`` adds its request from a worker thread, and a consumer that stops early
(``break``, task cancellation, ``aclose()``) queues its abort, which the step thread applies
before its next step. So the slot is free before the next step, and no step runs for it again.

Failures are confined to the request that caused them (:mod:`lmcore.engine.confinement`): a
request the engine failed alone ends its stream with that request's own error (``ValueError`` for
sampling parameters that broke its logits, ``RuntimeError`` otherwise) while the others go on. Only
if ``step()`` itself raises (a bug in the engine) are the requests in flight aborted, their streams
raising ``RuntimeError("generation failed: ...")``; the thread keeps serving new requests.

Threads: PyTorch's intra-op thread count is a per-thread OpenMP setting, so the step thread sets
its own with ``torch.set_num_threads(num_threads)`` when it starts (default 1: the decode loop is
memory-bound at the batch sizes served here, a second intra-op thread measured no faster at batch
1, and it leaves the other core to the asyncio/gRPC thread). Pass ``num_threads`` to change it.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator

import torch

from .engine import Engine
from .outputs import Completion, StepOutput, collect
from .sampling import SamplingParams


def merge_outputs(outputs: list[StepOutput]) -> StepOutput:
    """Consecutive outputs of one request as one: token ids, text and log-probabilities concatenated,
    ``finished``/``finish_reason`` and the token counts from the last."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    logprobs = None
    if any(o.logprobs is not None for o in outputs):
        logprobs = [lp for o in outputs for lp in (o.logprobs or ())]
    return StepOutput(last.request_id, [t for o in outputs for t in o.new_token_ids], "".join(o.text for o in outputs),
                      last.finished, last.finish_reason, logprobs, last.prompt_tokens, last.completion_tokens,
                      last.error, outputs[0].prompt_logprobs)


class _Stream:
    """One request's undelivered outputs, on its consumer's event loop (touched only there)."""

    __slots__ = ("loop", "items", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list = []  # StepOutputs, possibly ending with an exception
        self.waiter: asyncio.Future | None = None  # set while the consumer waits for the next output


def _push(batch: list[tuple[_Stream, object]]) -> None:
    """On a consumer loop: queue a step's outputs and wake their waiting consumers."""
    for stream, item in batch:
        stream.items.append(item)
        waiter = stream.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class AsyncEngine:
    def __init__(self, engine: Engine, num_threads: int = 1):
        self.engine = engine
        self.num_threads = num_threads
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._streams: dict[str, _Stream] = {}
        self._pending_aborts: list[str] = []  # appended by consumers, drained by the step thread
        self.error: Exception | None = None  # the last exception a step raised (its requests failed)

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the step thread (idempotent; ``stream`` starts it on first use)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lmcore-engine-step", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the step thread after its current step; unfinished streams end with an error."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._fail_all(RuntimeError("the engine was stopped"))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def __aenter__(self) -> AsyncEngine:
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.stop)

    # --- the step thread ----------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self.num_threads)
        while not self._stopping:
            with self._lock:
                while self._pending_aborts:
                    self.engine.abort(self._pending_aborts.pop())
                busy = self.engine.has_unfinished()
                if busy:
                    try:
                        outputs = self.engine.step()
                    except Exception as e:  # a bug or out of memory: fail what was in flight, keep serving
                        self.error = e
                        self._reset_after(e)
                        continue
                else:
                    self._wake.clear()
            if busy:
                if outputs:
                    self._deliver([(out.request_id, out) for out in outputs])
            else:
                self._wake.wait()

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        """Hand ``(request_id, output or exception)`` pairs to their streams: one call per loop."""
        streams = self._streams
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, item in items:
            stream = streams.get(rid)
            if stream is None:
                continue  # aborted: nobody is listening
            if isinstance(item, BaseException) or item.finished:
                streams.pop(rid, None)
            batch = batches.get(stream.loop)
            if batch is None:
                batch = batches[stream.loop] = []
            batch.append((stream, item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_push, batch)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

    def _fail_all(self, error: BaseException) -> None:
        self._deliver([(rid, error) for rid in list(self._streams)])

    def _reset_after(self, error: Exception) -> None:
        """A step raised: every request in flight (its state is unknown now) is aborted and its
        stream ends with the error; the engine itself stays up for new requests."""
        self.engine.abort_all()
        self._fail_all(error)

    # --- requests -----------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, adapter: str | int | None = None) -> str:
        """Thread-safe ``Engine.add_request`` (no stream attached; drive outputs yourself)."""
        with self._lock:
            rid = self.engine.add_request(prompt_ids, params, request_id, adapter)
        self._wake.set()
        return rid

    def add_adapter(self, name: str, adapter_dir) -> int:
        """Thread-safe ``Engine.add_adapter``: lands between steps; requests may name it at once."""
        with self._lock:
            return self.engine.add_adapter(name, adapter_dir)

    def remove_adapter(self, name: str) -> None:
        """Thread-safe ``Engine.remove_adapter`` (refused while a request uses the adapter)."""
        with self._lock:
            self.engine.remove_adapter(name)

    def abort(self, request_id: str) -> bool:
        """Thread-safe abort; the slot is free before the next step."""
        with self._lock:
            found = self.engine.abort(request_id)
        self._streams.pop(request_id, None)
        return found

    async def stream(self, prompt_ids: list[int], params: SamplingParams | None = None,
                     request_id: str | None = None, adapter: str | int | None = None) -> AsyncIterator[StepOutput]:
        """Yield the request's outputs as the engine produces them; the last has ``finished``.

        Each item holds everything produced since the previous one: one step's output when the
        consumer keeps up, several merged (:func:`merge_outputs`) when it fell behind.
        Raises ``ValueError``/``EngineOverloaded`` from ``add_request`` on the first iteration.
        Stopping early aborts the request.
        """
        self.start()
        loop = asyncio.get_running_loop()
        stream = _Stream(loop)
        rid = request_id if request_id is not None else f"req-{uuid.uuid4().hex}"

        state = {"added": False, "gone": False}  # gone: the consumer left before the add landed
        state_lock = threading.Lock()  # held only around the add itself, never across a step

        def add() -> None:  # in a worker thread: the engine lock may be held for a whole step
            with self._lock, state_lock:  # the queue is registered before any step can produce
                if state["gone"]:
                    return
                self.engine.add_request(prompt_ids, params, rid, adapter)
                self._streams[rid] = stream
                state["added"] = True
            self._wake.set()

        finished = False
        try:
            await asyncio.to_thread(add)
            while True:
                if not stream.items:
                    stream.waiter = loop.create_future()
                    await stream.waiter
                    stream.waiter = None
                items, stream.items = stream.items, []
                error = items.pop() if isinstance(items[-1], BaseException) else None  # only ever last
                if items:
                    out = merge_outputs(items)
                    if out.error is not None:  # this request failed alone (the engine goes on)
                        finished = True
                        raise out.error
                    finished = out.finished
                    yield out
                    if finished:
                        return
                if error is not None:
                    raise RuntimeError(f"generation failed: {error!r}") from error
        finally:
            if not finished:
                with state_lock:
                    state["gone"] = True
                    added = state["added"]
                self._streams.pop(rid, None)
                if added:
                    self._pending_aborts.append(rid)
                    self._wake.set()

    async def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, adapter: str | int | None = None) -> Completion:
        """Run one request to the end and return its aggregated :class:`Completion`."""
        done: dict[str, Completion] = {}
        rid = None
        async for out in self.stream(prompt_ids, params, request_id, adapter):
            rid = out.request_id
            collect([out], done, self.engine.tokenizer is not None)
        return done[rid]

    complete = generate
    generate_async = generate
