"""The fine-tuning API's bounds against a real redis-server: ids checked by pattern, watches limited
in number and duration on a pool of their own, Redis restarts ridden out, datasets deletable,
uploads with a line cap, and Redis growth bounded (event streams, the acked queue)."""

from __future__ import annotations

import contextlib
import json
import threading

import grpc
import pytest
import redis

from services.finetune.__main__ import setup
from services.finetune.client import FineTuneClient
from services.finetune.settings import FineTuneSettings
from services.finetune.store import GROUP, JobStore, Keys, ensure_group
from services.gen.lmstack.v1 import finetune_pb2 as pb
from tests.helpers.servers import ServerThread


def _records(n: int) -> bytes:
    return "".join(json.dumps({"prompt": f"Q: {i}?\nA:", "completion": f" {i}"}) + "\n" for i in range(n)).encode()


@contextlib.contextmanager
def serve_api(tiny_models, redis_url: str, store, **overrides):
    settings = FineTuneSettings(models=[f"tiny={tiny_models['tiny']}"], model_store=str(store), redis_url=redis_url,
                                port=0, **overrides)
    server = ServerThread(settings, "finetune", setup).start()
    client = FineTuneClient(server.target)
    try:
        yield client
    finally:
        client.close()
        server.stop()


@pytest.fixture
def api(tiny_models, redis_server, tmp_path):
    with serve_api(tiny_models, redis_server.url, tmp_path / "store", watch_max_s=1.0,
                   max_line_bytes=64 * 1024) as client:
        yield client


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_ids_tokens_and_names_are_checked_before_redis(api):
    ds = api.upload_dataset(_records(4))
    job = api.create_job("tiny", ds.id, max_steps=2)
    for call in (lambda: api.get_job(f"{job.id}:events"), lambda: api.cancel_job(job.id + ":checkpoints"),
                 lambda: api.list_checkpoints("x" * 10_000), lambda: api.get_dataset(ds.id + ":data"),
                 lambda: api.list_jobs(page_token="²"), lambda: list(api.stub.WatchJob(
                     pb.WatchJobRequest(id=job.id, after_event_id="latest"), timeout=30))):
        code, details = _status(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert len(details) < 300
    code, details = _status(lambda: api.create_job("b" * 300, ds.id, max_steps=2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 255" in details
    assert api.get_job(job.id).status == pb.JOB_STATUS_QUEUED


def test_watches_are_bounded_and_never_starve_other_rpcs(tiny_models, redis_server, tmp_path):
    with serve_api(tiny_models, redis_server.url, tmp_path / "store", max_watches=120, watch_max_s=600) as api:
        _watches_are_bounded(api)


def _watches_are_bounded(api):
    ds = api.upload_dataset(_records(4))
    job = api.create_job("tiny", ds.id, max_steps=2)  # no worker: it stays queued
    req = pb.WatchJobRequest(id=job.id)
    watches = [api.stub.WatchJob(req, timeout=60) for _ in range(110)]  # past redis-py's default pool of 100
    for w in watches:
        assert next(w).status == pb.JOB_STATUS_QUEUED
    assert api.get_job(job.id).id == job.id and api.list_jobs().jobs  # other RPCs are served meanwhile
    more = [api.stub.WatchJob(req, timeout=60) for _ in range(10)]
    for w in more:
        next(w)
    code, _ = _status(lambda: next(api.stub.WatchJob(req, timeout=60)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    for w in watches + more:
        w.cancel()


def test_a_watch_ends_after_its_maximum_and_the_client_resumes_it(api):
    ds = api.upload_dataset(_records(4))
    job = api.create_job("tiny", ds.id, max_steps=2)
    raw = list(api.stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=60))  # ends by itself (watch_max_s)
    assert [e.status for e in raw] == [pb.JOB_STATUS_QUEUED]
    seen = []
    cancel = threading.Timer(2.5, lambda: api.cancel_job(job.id))
    cancel.start()
    for event in api.watch_job(job.id, timeout=60):  # across several server-side watches
        seen.append(event)
    cancel.join()
    assert [e.status for e in seen if e.type == pb.JOB_EVENT_TYPE_STATUS] == [pb.JOB_STATUS_QUEUED,
                                                                              pb.JOB_STATUS_CANCELLED]
    assert len({e.id for e in seen}) == len(seen)


def test_a_redis_restart_is_invisible_to_the_next_call(api, redis_server):
    ds = api.upload_dataset(_records(4))
    job = api.create_job("tiny", ds.id, max_steps=2)
    redis_server.restart()
    assert api.get_job(job.id).status == pb.JOB_STATUS_QUEUED  # retried with backoff, no UNAVAILABLE


def test_datasets_can_be_deleted_once_no_unfinished_job_uses_them(api, redis_server):
    ds = api.upload_dataset(_records(4))
    job = api.create_job("tiny", ds.id, max_steps=2)
    assert _status(lambda: api.delete_dataset(ds.id))[0] == grpc.StatusCode.FAILED_PRECONDITION
    api.cancel_job(job.id)
    assert api.delete_dataset(ds.id).id == ds.id
    assert _status(lambda: api.get_dataset(ds.id))[0] == grpc.StatusCode.NOT_FOUND
    assert _status(lambda: api.delete_dataset(ds.id))[0] == grpc.StatusCode.NOT_FOUND
    assert not redis.Redis.from_url(redis_server.url).keys(f"*{ds.id}*")


def test_uploads_cap_the_line_length(api):
    long_line = json.dumps({"text": "x " * 40_000}).encode() + b"\n"  # 80 KB: past max_line_bytes 64 KiB
    code, details = _status(lambda: api.upload_dataset(_records(2) + long_line, chunk_bytes=1024))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_line_bytes" in details
    ok = json.dumps({"text": "y " * 20}).encode() + b"\n"
    assert api.upload_dataset(_records(3) + ok, chunk_bytes=7).examples == 4  # lines across tiny chunks


def test_list_jobs_by_status_pages_through_the_status_indexes(api):
    ds = api.upload_dataset(_records(4))
    jobs = [api.create_job("tiny", ds.id, max_steps=2) for _ in range(5)]
    for j in jobs[1::2]:
        api.cancel_job(j.id)
    queued = [j.id for j in reversed(jobs[0::2])]
    cancelled = [j.id for j in reversed(jobs[1::2])]
    assert [j.id for j in api.list_jobs(statuses=["queued"]).jobs] == queued
    assert [j.id for j in api.list_jobs(statuses=["cancelled"]).jobs] == cancelled
    token, seen = "", []
    while True:  # both statuses, merged newest first, one per page
        page = api.list_jobs(statuses=["queued", "cancelled"], page_size=1, page_token=token)
        seen += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [j.id for j in reversed(jobs)]


def test_event_streams_and_the_acked_queue_are_trimmed(redis_server):
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    keys = Keys("t")
    store = JobStore(r, keys, max_events=50)
    for i in range(600):
        store.event("ftjob-000000000001", "METRICS", f"step {i}")
    assert r.xlen(keys.events("ftjob-000000000001")) < 300  # MAXLEN ~ 50 (trimmed in whole nodes)
    ensure_group(r, keys)
    ids = [r.xadd(keys.queue, {"job_id": f"j{i}"}) for i in range(6)]
    got = r.xreadgroup(GROUP, "w", {keys.queue: ">"}, count=4)[0][1]  # 4 delivered, 2 still queued
    r.xack(keys.queue, GROUP, got[0][0], got[1][0], got[3][0])  # the third stays pending (leased)
    store.trim_queue()
    left = [m for m, _ in r.xrange(keys.queue)]
    assert left == ids[2:]  # acked entries before the pending one went; pending and queued stay
