"""How much work one request may cause: the services' shared bounds helpers (one owner each).

* :func:`offload`: small work runs inline on the event loop (a thread hop costs more than it),
  work past ``OFFLOAD_CHARS`` goes to a worker thread, so one large request never stalls the
  loop's other RPCs or health checks (tiktoken's core releases the GIL).
* :class:`BoundedExecutor`: heavy work of one kind (Score's forward passes) runs on its own few
  threads with a bounded queue; past it the request is ``RESOURCE_EXHAUSTED`` at once, so a burst
  of heavy requests queues behind itself, never in the shared default executor everyone else uses.
* :func:`check_name`: a model name is at most ``MAX_NAME_CHARS`` characters and names no path
  (checked before any filesystem or store lookup, so a long or odd name is INVALID_ARGUMENT, not
  an ``OSError``).
* :func:`response_bound`: an upper bound on an id list's encoded size, to refuse before the work
  a request whose answer could not fit the message limit.

The rules about what lmcore executes (sampling bounds, the context, stop strings) are lmcore's
(``lmcore.engine``); the limits here are the services' settings (``services.config``).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from .errors import InvalidArgument, ResourceExhausted

OFFLOAD_CHARS = 64 * 1024
MAX_NAME_CHARS = 255  # a file name's limit on every common filesystem: store entries are directories


async def offload(fn, *args, size: int = 0, **kwargs):
    """``fn(*args, **kwargs)`` inline when ``size`` is small, in a worker thread when it is large."""
    if size > OFFLOAD_CHARS:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def check_name(name: str, what: str = "model") -> str:
    """``name`` if it can name a model (empty: the default); InvalidArgument otherwise."""
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(f"{what} name is {len(name)} characters; names are at most {MAX_NAME_CHARS}")
    if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        raise InvalidArgument(f"{what} name {name[:80]!r} is not a valid name (no '/', '\\\\', NUL, '.' or '..')")
    return name


def varint_bytes(value: int) -> int:
    """Bytes of ``value`` as a protobuf varint (non-negative)."""
    return max(1, (value.bit_length() + 6) // 7)


def response_bound(n_ids: int, max_id: int, n_lists: int = 1) -> int:
    """At most how many bytes ``n_ids`` token ids below ``max_id`` take in ``n_lists`` packed
    repeated fields (each list: a tag, a length and its ids)."""
    return n_ids * varint_bytes(max_id) + n_lists * 16 + 16


class BoundedExecutor:
    """``workers`` threads and at most ``max_waiting`` queued calls; beyond that, ``ResourceExhausted``.

    ``initializer`` runs once per thread (e.g. ``torch.set_num_threads``)."""

    def __init__(self, workers: int, max_waiting: int, name: str, initializer=None):
        self.limit = workers + max_waiting
        self.name = name
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=initializer)
        self._lock = threading.Lock()
        self._in_flight = 0

    async def run(self, fn, *args):
        with self._lock:
            if self._in_flight >= self.limit:
                raise ResourceExhausted(f"server overloaded, retry later: {self._in_flight} {self.name} requests "
                                        "are running or queued")
            self._in_flight += 1
        future = self._pool.submit(fn, *args)
        future.add_done_callback(self._done)  # when the work ends (or is cancelled before it starts),
        return await asyncio.wrap_future(future)  # not when a cancelled caller stops waiting for it

    def _done(self, _future) -> None:
        with self._lock:
            self._in_flight -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
