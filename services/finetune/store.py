"""Redis as the queue and the job store: the keys, the atomic transitions, and their guarantees.

Keys (``P`` is the prefix, ``lmstack:ft`` by default)::

    P:queue                  stream of {job_id}; consumer group "workers" (the work queue)
    P:jobs                   sorted set: job id by creation time (ListJobs, newest first)
    P:jobs:<STATUS>          sorted set per status, same scores (ListJobs by status pages without scanning)
    P:job:<id>               hash: the job record (status, hyperparameters, progress, result)
    P:job:<id>:events        stream: the job's events (WatchJob replays it, then blocks on it)
    P:job:<id>:checkpoints   list: one JSON entry per checkpoint saved
    P:idem:<tenant>:<key>    string: the job an idempotency key created (keys are per tenant)
    P:ds:<id>, P:ds:<id>:data  hash + string: a dataset's metadata (``tenant`` = its owner) and its JSONL
    P:workers                sorted set: worker id by the last time it polled or heartbeat (liveness)
    P:ds:<id>:jobs           set: the jobs created on the dataset (DeleteDataset refuses while one is unfinished)
    P:tenant:<t>:jobs        sorted set: the tenant's jobs by creation time (a member's ListJobs)
    P:tenant:<t>:active      set: the tenant's jobs that may still be queued or running (active_jobs quota)
    P:tenant:<t>:datasets    set: the tenant's datasets (dataset_bytes quota)

**Growth is bounded.** A job's event stream is trimmed (``XADD ... MAXLEN ~ max_events_per_job``:
the oldest progress events go first); acknowledged queue entries are trimmed by the workers
(:meth:`JobStore.trim_queue`: ``XTRIM MINID`` up to the oldest entry still pending or undelivered,
so a queued job is never trimmed); a finished job's records expire after ``finished_job_ttl_s``
and its checkpoints beyond ``checkpoints_kept_after_finish`` are deleted; datasets are deleted
with ``DeleteDataset``.

Jobs and datasets carry a ``tenant`` field (``services.tenants``); the handler answers ``NOT_FOUND``
for another tenant's. Quotas are checked inside the scripts that create (``create``,
``store_dataset``), so two concurrent requests cannot both take the last slot.

**Why a stream with a consumer group.** ``XREADGROUP`` hands each queued job to exactly one
worker and records it in the group's pending list (PEL) under that worker's name until it is
``XACK``-ed. The PEL entry is the job's *lease*: a running worker renews it every heartbeat by
re-claiming its own entry (``XCLAIM`` with min-idle 0 resets the idle time). A worker that dies
(kill -9) stops renewing; once the entry is idle for ``reclaim_idle_s`` another worker takes it
with ``XAUTOCLAIM`` and resumes from the job's latest checkpoint. With ``appendonly`` on, the
stream, the group, the PEL and the job hashes all survive a Redis restart: a queued job is never
lost.

**Why Lua.** Every status transition is one script, so it is atomic, and every script a worker runs
checks that the job is still *its own* (``worker`` and ``attempt`` match, a fencing token): a worker
that was presumed dead and wakes up later cannot mark the job done, so a job succeeds at most once
even when two workers briefly believe they own it. ``start`` also ignores stale queue entries (the
job's ``queue_msg_id`` must match), and a job cancelled while queued is acknowledged and skipped.

Two clients use these definitions: the worker (``redis.Redis``, this module's :class:`JobStore`)
and the API server (``redis.asyncio``, ``services.finetune.handler``). Both use :class:`Keys`,
:data:`SCRIPTS` and the decoders here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

GROUP = "workers"
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
STATUSES = ("QUEUED", "RUNNING", *TERMINAL)


@dataclass(frozen=True)
class Keys:
    prefix: str = "lmstack:ft"

    @property
    def queue(self) -> str:
        return f"{self.prefix}:queue"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def checkpoints(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:checkpoints"

    def idempotency(self, key: str, tenant: str = "") -> str:
        return f"{self.prefix}:idem:{tenant}:{key}" if tenant else f"{self.prefix}:idem:{key}"

    def tenant_jobs(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def tenant_active(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:active"

    def tenant_datasets(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:datasets"

    def dataset(self, dataset_id: str) -> str:
        return f"{self.prefix}:ds:{dataset_id}"

    def dataset_data(self, dataset_id: str) -> str:
        return f"{self.prefix}:ds:{dataset_id}:data"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"
    def dataset_jobs(self, dataset_id: str) -> str:
        return f"{self.prefix}:ds:{dataset_id}:jobs"

    def status_index(self, status: str) -> str:
        return f"{self.prefix}:jobs:{status}"


# Moves a job between the per-status indexes (its score: the creation time in the P:jobs set).
# Every script that changes a status calls it, so the indexes change atomically with the status.
# The scripts take the key prefix as their last KEYS entry to name the index keys.
_MOVE = """
local function move(p, id, from, to)
  if from then redis.call('ZREM', p .. ':jobs:' .. from, id) end
  local score = redis.call('ZSCORE', p .. ':jobs', id)
  if score then redis.call('ZADD', p .. ':jobs:' .. to, score, id) end
end
"""


# Every script returns a small array: {outcome, detail}. KEYS/ARGV are documented per script.
SCRIPTS = {
    # KEYS: job, jobs zset, queue, events, idempotency key (may be a dummy when ARGV[3] == "0"),
    # the dataset's job set, the key prefix, the tenant's jobs zset, the tenant's active set
    # ARGV: job id, created score (µs), has idempotency key "1"/"0", now, active_jobs limit (0: none),
    #       published_models limit, models the tenant already published, then field/value pairs
    # Quotas are checked here, in the same script that queues the job, so concurrent creates cannot
    # overshoot: the active set is pruned of jobs that ended (any process may end a job) and counted.
    "create": _MOVE + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'collision', ARGV[1], ''} end
if ARGV[3] == '1' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {'exists', existing, ''} end
end
local active = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[9])) do
  local st = redis.call('HGET', KEYS[7] .. ':job:' .. id, 'status')
  if st == 'QUEUED' or st == 'RUNNING' then active = active + 1 else redis.call('SREM', KEYS[9], id) end
end
local limit = tonumber(ARGV[5])
if limit > 0 and active >= limit then return {'quota', 'active_jobs', tostring(active)} end
local published = tonumber(ARGV[7]) + active
limit = tonumber(ARGV[6])
if limit > 0 and published >= limit then return {'quota', 'published_models', tostring(published)} end
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[8], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[9], ARGV[1])
local msg = redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[1])
redis.call('HSET', KEYS[1], 'queue_msg_id', msg, 'status', 'QUEUED')
move(KEYS[7], ARGV[1], nil, 'QUEUED')
redis.call('SADD', KEYS[6], ARGV[1])
redis.call('XADD', KEYS[4], '*', 'type', 'STATUS', 'status', 'QUEUED', 'time', ARGV[4],
           'message', 'job created and queued')
if ARGV[3] == '1' then redis.call('SET', KEYS[5], ARGV[1]) end
return {'created', ARGV[1], ''}
""",
    # KEYS: dataset data, dataset hash, the tenant's dataset set.
    # ARGV: key prefix, dataset_bytes limit (0: none), this dataset's bytes, the data, then field/value pairs.
    # Sums the tenant's stored datasets (forgetting deleted ones) and stores this one only if it fits.
    "store_dataset": """
local used = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local b = redis.call('HGET', ARGV[1] .. ':ds:' .. id, 'bytes')
  if b then used = used + tonumber(b) else redis.call('SREM', KEYS[3], id) end
end
local limit = tonumber(ARGV[2])
if limit > 0 and used + tonumber(ARGV[3]) > limit then return {'quota', tostring(used)} end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('SET', KEYS[1], ARGV[4])
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('SADD', KEYS[3], redis.call('HGET', KEYS[2], 'id'))
return {'stored', tostring(used)}
""",
    # KEYS: job, events, queue, prefix.  ARGV: worker, queue msg id, group, now
    "start": _MOVE + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then redis.call('XACK', KEYS[3], ARGV[3], ARGV[2]); return {'skip', 'missing'} end
if redis.call('HGET', KEYS[1], 'queue_msg_id') ~= ARGV[2] then
  redis.call('XACK', KEYS[3], ARGV[3], ARGV[2]); return {'skip', 'stale'}
end
if st == 'SUCCEEDED' or st == 'FAILED' or st == 'CANCELLED' then
  redis.call('XACK', KEYS[3], ARGV[3], ARGV[2]); return {'skip', st}
end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'CANCELLED', 'finished_at', ARGV[4])
  move(KEYS[4], redis.call('HGET', KEYS[1], 'id'), st, 'CANCELLED')
  redis.call('XADD', KEYS[2], '*', 'type', 'STATUS', 'status', 'CANCELLED', 'time', ARGV[4],
             'message', 'cancelled before it could resume')
  redis.call('XACK', KEYS[3], ARGV[3], ARGV[2]); return {'skip', 'CANCELLED'}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
local previous = redis.call('HGET', KEYS[1], 'worker')
redis.call('HSET', KEYS[1], 'status', 'RUNNING', 'worker', ARGV[1], 'heartbeat_at', ARGV[4])
move(KEYS[4], redis.call('HGET', KEYS[1], 'id'), st, 'RUNNING')
if not redis.call('HGET', KEYS[1], 'started_at') then redis.call('HSET', KEYS[1], 'started_at', ARGV[4]) end
local why = 'started by worker ' .. ARGV[1]
if attempt > 1 then why = 'resumed by worker ' .. ARGV[1] .. ' (attempt ' .. attempt .. ')' end
redis.call('XADD', KEYS[2], '*', 'type', 'STATUS', 'status', 'RUNNING', 'time', ARGV[4], 'message', why)
return {'run', tostring(attempt), st}
""",
    # KEYS: job, queue.  ARGV: worker, attempt, group, queue msg id, now
    # Renews the lease; returns {'ok', cancel_requested} or {'lost', ''}.
    "heartbeat": """
local f = redis.call('HMGET', KEYS[1], 'worker', 'attempt', 'status', 'cancel_requested')
if f[1] ~= ARGV[1] or f[2] ~= ARGV[2] or f[3] ~= 'RUNNING' then return {'lost', ''} end
redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[1], 0, ARGV[4], 'JUSTID')
redis.call('HSET', KEYS[1], 'heartbeat_at', ARGV[5])
return {'ok', f[4] or ''}
""",
    # KEYS: job, events, queue, prefix.  ARGV: worker, attempt, group, queue msg id, now, final status,
    # event message, event data (JSON), then field/value pairs to set on the job
    "finish": _MOVE + """
local f = redis.call('HMGET', KEYS[1], 'worker', 'attempt', 'status')
if f[1] ~= ARGV[1] or f[2] ~= ARGV[2] or f[3] ~= 'RUNNING' then return {'lost', f[3] or ''} end
local fields = {'status', ARGV[6], 'finished_at', ARGV[5]}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
move(KEYS[4], redis.call('HGET', KEYS[1], 'id'), 'RUNNING', ARGV[6])
redis.call('XADD', KEYS[2], '*', 'type', 'STATUS', 'status', ARGV[6], 'time', ARGV[5], 'message', ARGV[7],
           'data', ARGV[8])
redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
return {'done', ARGV[6]}
""",
    # A worker shutting down hands its job back: ack its entry, queue a fresh one.
    # KEYS: job, events, queue, prefix.  ARGV: worker, attempt, group, queue msg id, now, message
    "requeue": _MOVE + """
local f = redis.call('HMGET', KEYS[1], 'worker', 'attempt', 'status')
if f[1] ~= ARGV[1] or f[2] ~= ARGV[2] or f[3] ~= 'RUNNING' then return {'lost', ''} end
redis.call('XACK', KEYS[3], ARGV[3], ARGV[4])
local msg = redis.call('XADD', KEYS[3], '*', 'job_id', redis.call('HGET', KEYS[1], 'id'))
redis.call('HSET', KEYS[1], 'status', 'QUEUED', 'queue_msg_id', msg, 'worker', '')
move(KEYS[4], redis.call('HGET', KEYS[1], 'id'), 'RUNNING', 'QUEUED')
redis.call('XADD', KEYS[2], '*', 'type', 'STATUS', 'status', 'QUEUED', 'time', ARGV[5], 'message', ARGV[6])
return {'queued', msg}
""",
    # KEYS: job, events, prefix.  ARGV: now
    "cancel": _MOVE + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', ''} end
if st == 'QUEUED' then
  redis.call('HSET', KEYS[1], 'status', 'CANCELLED', 'finished_at', ARGV[1], 'cancel_requested', '1')
  move(KEYS[3], redis.call('HGET', KEYS[1], 'id'), 'QUEUED', 'CANCELLED')
  redis.call('XADD', KEYS[2], '*', 'type', 'STATUS', 'status', 'CANCELLED', 'time', ARGV[1],
             'message', 'cancelled while queued')
  return {'cancelled', st}
end
if st == 'RUNNING' then
  if redis.call('HGET', KEYS[1], 'cancel_requested') ~= '1' then
    redis.call('HSET', KEYS[1], 'cancel_requested', '1')
    redis.call('XADD', KEYS[2], '*', 'type', 'INFO', 'time', ARGV[1],
               'message', 'cancellation requested; the worker stops after the current step')
  end
  return {'requested', st}
end
return {'terminal', st}
""",
    # KEYS: dataset hash, dataset data, dataset job set, prefix.  Refused while a job on it is unfinished.
    "delete_dataset": """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing', ''} end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local st = redis.call('HGET', KEYS[4] .. ':job:' .. id, 'status')
  if st == 'QUEUED' or st == 'RUNNING' then return {'busy', id} end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return {'deleted', ''}
""",
}


def redis_client(url: str, asyncio: bool = False, max_connections: int | None = None,
                 password: str | None = None):
    """A client that retries a command across a dropped connection (a Redis restart) for a while:
    exponential backoff from 50 ms, capped at 1 s, 8 retries (about 5 s in all), so a restart of a
    few seconds is invisible to callers. The asyncio client needs ``redis.asyncio.retry.Retry``:
    given the synchronous ``Retry`` it never retries. ``max_connections`` bounds its pool;
    ``password`` (``--redis-password-file``) overrides the URL's."""
    errors = [redis.ConnectionError, redis.TimeoutError]
    kw = dict(retry_on_error=errors, health_check_interval=10, socket_keepalive=True)
    if max_connections is not None:
        kw["max_connections"] = max_connections
    if password:
        kw["password"] = password
    if asyncio:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry as AsyncRetry

        return aioredis.Redis.from_url(url, decode_responses=True, retry=AsyncRetry(_backoff(), 8), **kw)
    return redis.Redis.from_url(url, decode_responses=True, retry=Retry(_backoff(), 8), **kw)


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=1.0, base=0.05)


def redacted(url: str) -> str:
    """``url`` without its password, for log lines."""
    import re

    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def now() -> str:
    return f"{time.time():.6f}"


def decode_list(value) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in value]


def ensure_group(r: redis.Redis, keys: Keys) -> None:
    """Create the queue stream and its consumer group if missing (id 0: no queued job is skipped)."""
    try:
        r.xgroup_create(keys.queue, GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


class JobStore:
    """The worker's side of the store (synchronous ``redis.Redis``)."""

    def __init__(self, r: redis.Redis, keys: Keys, max_events: int = 1000):
        self.r, self.keys = r, keys
        self.max_events = max_events  # per job: older progress events are trimmed away
        self.scripts = {name: r.register_script(src) for name, src in SCRIPTS.items()}

    def ensure_group(self) -> None:
        ensure_group(self.r, self.keys)

    # --- reading ------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict:
        return self.r.hgetall(self.keys.job(job_id))

    def dataset_text(self, dataset_id: str) -> str | None:
        """The dataset's JSONL (validated UTF-8 at upload, so stored and read as text)."""
        return self.r.get(self.keys.dataset_data(dataset_id))

    # --- queue --------------------------------------------------------------------------------
    def next_message(self, consumer: str, reclaim_idle_ms: int, block_ms: int) -> tuple[str, str] | None:
        """A job to run: first one whose worker went silent (XAUTOCLAIM), else a new one (XREADGROUP)."""
        _, claimed, _ = self.r.xautoclaim(self.keys.queue, GROUP, consumer, min_idle_time=reclaim_idle_ms,
                                          start_id="0-0", count=1)
        if claimed:
            msg_id, fields = claimed[0]
            if fields:  # a deleted entry comes back without fields
                return msg_id, fields["job_id"]
            self.r.xack(self.keys.queue, GROUP, msg_id)
        got = self.r.xreadgroup(GROUP, consumer, {self.keys.queue: ">"}, count=1, block=block_ms)
        if got:
            _, entries = got[0]
            msg_id, fields = entries[0]
            return msg_id, fields["job_id"]
        return None

    def prune_consumers(self, idle_ms: int = 3_600_000) -> list[str]:
        """Forget consumers (dead workers' names) with nothing pending that were idle for ``idle_ms``."""
        gone = []
        for c in self.r.xinfo_consumers(self.keys.queue, GROUP):
            if c["pending"] == 0 and c["idle"] > idle_ms:
                self.r.xgroup_delconsumer(self.keys.queue, GROUP, c["name"])
                gone.append(c["name"])
        return gone

    # --- transitions (all fenced by worker + attempt) ----------------------------------------------
    def start(self, job_id: str, worker: str, msg_id: str) -> tuple[str, ...]:
        """``("run", attempt, previous status)``: previous ``RUNNING`` means taken over from a silent
        worker, ``QUEUED`` a fresh or requeued job; else ``("skip", why)``."""
        k = self.keys
        return tuple(decode_list(self.scripts["start"](
            keys=[k.job(job_id), k.events(job_id), k.queue, k.prefix], args=[worker, msg_id, GROUP, now()])))

    def heartbeat(self, job_id: str, worker: str, attempt: int, msg_id: str) -> tuple[str, str]:
        k = self.keys
        return tuple(decode_list(self.scripts["heartbeat"](
            keys=[k.job(job_id), k.queue], args=[worker, str(attempt), GROUP, msg_id, now()])))

    def finish(self, job_id: str, worker: str, attempt: int, msg_id: str, status: str, message: str,
               data: dict | None = None, fields: dict | None = None) -> bool:
        k = self.keys
        pairs = [x for kv in (fields or {}).items() for x in (kv[0], _str(kv[1]))]
        out = decode_list(self.scripts["finish"](
            keys=[k.job(job_id), k.events(job_id), k.queue, k.prefix],
            args=[worker, str(attempt), GROUP, msg_id, now(), status, message, json.dumps(data or {}), *pairs]))
        return out[0] == "done"

    def requeue(self, job_id: str, worker: str, attempt: int, msg_id: str, message: str) -> bool:
        k = self.keys
        out = decode_list(self.scripts["requeue"](
            keys=[k.job(job_id), k.events(job_id), k.queue, k.prefix],
            args=[worker, str(attempt), GROUP, msg_id, now(), message]))
        return out[0] == "queued"

    # --- progress -----------------------------------------------------------------------------
    def event(self, job_id: str, type_: str, message: str = "", data: dict | None = None,
              fields: dict | None = None) -> None:
        """Append an event (and update job fields) in one round trip."""
        pipe = self.r.pipeline(transaction=True)
        if fields:
            pipe.hset(self.keys.job(job_id), mapping={k: _str(v) for k, v in fields.items()})
        pipe.xadd(self.keys.events(job_id), {"type": type_, "time": now(), "message": message,
                                             "data": json.dumps(data or {})}, maxlen=self.max_events, approximate=True)
        pipe.execute()

    def worker_seen(self, worker: str, forget_after_s: float = 86400.0) -> None:
        """Record that ``worker`` is alive now (every poll and lease heartbeat); forget workers
        silent for ``forget_after_s``. ``services.finetune.metrics`` counts the recent ones."""
        t = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(self.keys.workers, {worker: t})
        pipe.zremrangebyscore(self.keys.workers, "-inf", t - forget_after_s)
        pipe.execute()

    def add_checkpoint(self, job_id: str, entry: dict, keep: int = 100) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(self.keys.checkpoints(job_id), json.dumps(entry))
        pipe.ltrim(self.keys.checkpoints(job_id), -keep, -1)  # the records of rotated-away checkpoints
        pipe.execute()

    def trim_queue(self) -> int:
        """Drop acknowledged queue entries: everything older than both the oldest entry still
        pending (leased to a worker) and the group's last delivered entry (newer ones are queued
        jobs nobody has read yet). Returns how many entries went."""
        queue = self.keys.queue
        group = next((g for g in self.r.xinfo_groups(queue) if g["name"] == GROUP), None)
        if group is None:
            return 0
        floor = group["last-delivered-id"]
        pending = self.r.xpending(queue, GROUP)
        if pending["pending"] and _stream_id(pending["min"]) < _stream_id(floor):
            floor = pending["min"]
        if floor in ("0-0", None):
            return 0
        return self.r.xtrim(queue, minid=floor, approximate=False)

    def retain(self, job_id: str, ttl_s: float) -> None:
        """A finished job's records (hash, events, checkpoint list, idempotency key) expire after
        ``ttl_s`` (0: kept forever); ListJobs drops the index entries of expired jobs as it meets them."""
        if ttl_s <= 0:
            return
        k, ttl = self.keys, max(1, int(ttl_s))
        key = self.r.hget(k.job(job_id), "idempotency_key")
        pipe = self.r.pipeline(transaction=False)
        for name in (k.job(job_id), k.events(job_id), k.checkpoints(job_id), *([k.idempotency(key)] if key else [])):
            pipe.expire(name, ttl)
        pipe.execute()

    def control(self, job_id: str, worker: str, attempt: int) -> tuple[bool, bool]:
        """(cancel requested, still ours): polled before every optimizer step."""
        cancel, w, a, st = self.r.hmget(self.keys.job(job_id), "cancel_requested", "worker", "attempt", "status")
        return cancel == "1", (w == worker and a == str(attempt) and st == "RUNNING")


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _str(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, dict | list):
        return json.dumps(v)
    return "" if v is None else str(v)
