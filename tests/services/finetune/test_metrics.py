"""The fine-tuning API's job-store metrics when Redis is empty or gone (the live Prometheus test,
tests/deploy/test_observability.py, covers them with running jobs and a frozen worker)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.finetune.metrics import register_job_store_metrics
from services.finetune.store import STATUSES, JobStore, Keys, redis_client
from tests.helpers import free_port


def scrape(redis_url: str, keys: Keys = Keys()) -> dict:
    registry = CollectorRegistry()
    register_job_store_metrics(registry, redis_url, keys, alive_window_s=30)
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_an_empty_store_reports_zeros_and_no_running_jobs(redis_server):
    got = scrape(redis_server.url)
    assert got[("lmstack_finetune_job_store_up", ())] == 1
    assert {k[1][0][1]: v for k, v in got.items() if k[0] == "lmstack_finetune_jobs"} == \
        dict.fromkeys((s.lower() for s in STATUSES), 0.0)
    assert got[("lmstack_finetune_oldest_queued_job_age_seconds", ())] == 0
    assert got[("lmstack_finetune_workers_alive", ())] == 0
    assert not any("job_id" in dict(labels) for _, labels in got)


def test_workers_heard_from_within_the_window_count_as_alive(redis_server):
    import time

    keys = Keys()
    store = JobStore(redis_client(redis_server.url), keys)
    store.worker_seen("w1")
    store.worker_seen("w2")
    store.r.zadd(keys.workers, {"silent": time.time() - 31})  # last heard from past the 30 s window
    assert scrape(redis_server.url)[("lmstack_finetune_workers_alive", ())] == 2
    store.r.zadd(keys.workers, {"ancient": time.time() - 2 * 86400})
    store.worker_seen("w1")  # forgets workers silent for a day
    assert store.r.zrange(keys.workers, 0, -1) == ["silent", "w2", "w1"]


def test_redis_down_keeps_the_scrape_alive_and_says_so():
    got = scrape(f"redis://127.0.0.1:{free_port()}/0")
    assert got == {("lmstack_finetune_job_store_up", ()): 0.0}
