"""Fine-tuning metrics: the queue and the jobs as Redis holds them, and each worker's own work.

Two processes export them (names ``lmstack_finetune_<what>_<unit>``; meanings and the alerts built
on them: ``docs/monitoring.md``):

* the **fine-tuning API** (``python -m services.finetune``) registers :class:`JobStoreCollector`,
  which reads Redis *at scrape time* (one pipelined round trip over every job, plus ``XINFO
  ``P:workers``), so the numbers are the store's, whichever worker did the work:
  ``lmstack_finetune_jobs{status}``, ``lmstack_finetune_oldest_queued_job_age_seconds``,
  ``lmstack_finetune_workers_alive``, ``lmstack_finetune_job_store_up`` and, for each *running*
  job only (label ``job_id``: the series ends with the job, so label values stay bounded by the
  jobs running at once), ``lmstack_finetune_job_step``, ``..._job_total_steps``,
  ``..._job_train_loss``, ``..._job_eval_loss``, ``..._job_learning_rate`` and
  ``..._job_tokens_per_second``.
* every **worker** exports :class:`WorkerMetrics` on its own port: jobs it finished by outcome and
  how long they took, the jobs it reclaimed from dead workers, its optimizer steps, trained tokens
  and lease heartbeats, and whether it is busy.

"Alive" means heard from through Redis: a worker records itself in ``P:workers`` at every queue
poll (every ``poll_s``) and every lease heartbeat while it trains (``JobStore.worker_seen``), so a
worker silent for longer than ``reclaim_idle_s`` (the window after which its job would be taken
over) is counted dead, whether it crashed, hung or lost its network. Prometheus' own ``up`` for the
worker's port says the same from the other side; the alert on queued jobs uses the store's view
because an autoscaled pool need not be scraped worker by worker. (The consumer group's idle times
cannot serve: Redis 7.0 creates a consumer only once it is handed an entry, so a fresh idle worker
would not be listed.)
"""

from __future__ import annotations

import logging
import time

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from .store import STATUSES, Keys

log = logging.getLogger("lmstack.finetune.metrics")

# From a few seconds (a tiny LoRA job) to a day.
JOB_DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)

OUTCOMES = ("succeeded", "failed", "cancelled", "requeued", "lost")

# Running-job gauges: job hash field -> (metric suffix, help).
RUNNING_JOB_FIELDS = {
    "step": ("job_step", "Optimizer steps done by the running job"),
    "total_steps": ("job_total_steps", "Optimizer steps the running job will run in all"),
    "train_loss": ("job_train_loss", "The running job's latest training loss"),
    "eval_loss": ("job_eval_loss", "The running job's latest held-out loss"),
    "learning_rate": ("job_learning_rate", "The running job's current learning rate"),
    "tokens_per_s": ("job_tokens_per_second", "The running job's training throughput (input tokens/s)"),
}


class WorkerMetrics:
    """``lmstack_finetune_worker_*`` on the worker's own /metrics port."""

    def __init__(self):
        self.registry = CollectorRegistry()
        p = "lmstack_finetune_worker"
        self.jobs = Counter(f"{p}_jobs", "Job attempts this worker ended, by outcome (succeeded, failed, "
                            "cancelled, requeued, lost)", ["outcome"], registry=self.registry)
        self.job_duration = Histogram(f"{p}_job_duration_seconds", "Time from a job's first start to the end "
                                      "of its attempt on this worker, by outcome", ["outcome"],
                                      buckets=JOB_DURATION_BUCKETS, registry=self.registry)
        self.reclaimed = Counter(f"{p}_jobs_reclaimed", "Jobs this worker took over from a worker that "
                                 "stopped heartbeating", registry=self.registry)
        self.heartbeats = Counter(f"{p}_heartbeats", "Lease heartbeats sent for running jobs, by result "
                                  "(ok, lost, error)", ["result"], registry=self.registry)
        self.steps = Counter(f"{p}_optimizer_steps", "optimizer steps run", registry=self.registry)
        self.tokens = Counter(f"{p}_trained_tokens", "input tokens trained on", registry=self.registry)
        self.busy = Gauge(f"{p}_busy", "1 while a job runs", registry=self.registry)
        # Every known label value exported from the start (at 0), so the first job's end is an
        # increase Prometheus sees rather than a series that appears already at 1.
        for outcome in OUTCOMES:
            self.jobs.labels(outcome)
            self.job_duration.labels(outcome)
        for result in ("ok", "lost", "error"):
            self.heartbeats.labels(result)

    def job_ended(self, outcome: str, started_at: float) -> None:
        self.jobs.labels(outcome).inc()
        self.job_duration.labels(outcome).observe(max(0.0, time.time() - started_at))


class JobStoreCollector:
    """The queue and the jobs, read from Redis whenever Prometheus scrapes the fine-tuning API.

    Uses its own synchronous client (a scrape runs on the metrics server's thread, not the event
    loop) with short timeouts; when Redis does not answer, only ``lmstack_finetune_job_store_up 0``
    is exported, so the scrape itself still succeeds and the API is not reported down.
    """

    def __init__(self, client: redis.Redis, keys: Keys, alive_window_s: float):
        self.r, self.keys, self.alive_window_s = client, keys, alive_window_s

    def collect(self):
        up = GaugeMetricFamily("lmstack_finetune_job_store_up", "1 when the job store (Redis) answered this "
                               "scrape")
        try:
            families = self._families()
        except redis.RedisError as e:
            log.warning("metrics scrape: job store unreachable (%s)", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> list:
        k, fields = self.keys, list(RUNNING_JOB_FIELDS)
        ids = self.r.zrange(k.jobs, 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(k.job(job_id), "status", "queue_msg_id", *fields)
        rows = pipe.execute() if ids else []
        now_ms = time.time() * 1000

        by_status = dict.fromkeys(STATUSES, 0)
        oldest_ms = None
        running = {f: GaugeMetricFamily(f"lmstack_finetune_{name}", doc, labels=["job_id"])
                   for f, (name, doc) in RUNNING_JOB_FIELDS.items()}
        for job_id, (status, msg_id, *values) in zip(ids, rows):
            if status not in by_status:
                continue  # a job hash expired or half-written
            by_status[status] += 1
            if status == "QUEUED" and msg_id:
                queued_ms = int(msg_id.split("-")[0])  # a stream id starts with its entry's time in ms
                oldest_ms = queued_ms if oldest_ms is None else min(oldest_ms, queued_ms)
            elif status == "RUNNING":
                for field, value in zip(fields, values):
                    if value not in (None, ""):
                        running[field].add_metric([job_id], float(value))

        jobs = GaugeMetricFamily("lmstack_finetune_jobs", "Jobs in the store, by status", labels=["status"])
        for status, n in by_status.items():
            jobs.add_metric([status.lower()], n)
        age = GaugeMetricFamily("lmstack_finetune_oldest_queued_job_age_seconds", "How long the oldest queued "
                                "job has waited for a worker (0: none queued)")
        age.add_metric([], 0.0 if oldest_ms is None else max(0.0, (now_ms - oldest_ms) / 1000))
        alive = GaugeMetricFamily("lmstack_finetune_workers_alive", "Workers the queue heard from within "
                                  "reclaim_idle_s")
        alive.add_metric([], self.r.zcount(k.workers, now_ms / 1000 - self.alive_window_s, "+inf"))
        return [jobs, age, alive, *running.values()]


def register_job_store_metrics(registry: CollectorRegistry, redis_url: str, keys: Keys, alive_window_s: float,
                               password: str | None = None) -> None:
    """Export :class:`JobStoreCollector` on ``registry`` (the fine-tuning API's). ``password``
    (``--redis-password-file``) overrides the URL's, as for the API's own clients. No retries: a
    scrape reports the store down at once rather than waiting out a restart."""
    kw = {"password": password} if password else {}
    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0,
                                  **kw)
    registry.register(JobStoreCollector(client, keys, alive_window_s))
