"""The fine-tuning service end to end: real redis-server, real API and worker processes, real gRPC.

A tiny base model is trained from scratch once per module (lmcore's own trainer); every test gets
its own Redis (the conftest fixture), model store and API server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from services.client import Client
from services.finetune.client import FineTuneClient, status_name
from services.gen.lmstack.v1 import finetune_pb2 as pb
from tests.helpers import ROOT, free_port


# --- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    from lmcore.model import GPTConfig
    from lmcore.training import TrainConfig, train_from_scratch

    out = tmp_path_factory.mktemp("base") / "tiny"
    train_from_scratch(sorted((ROOT / "lmcore").rglob("*.py")), out, GPTConfig.from_preset("tiny", vocab_size=400),
                       TrainConfig(max_steps=40, batch_size=8, learning_rate=3e-3, seed=0), eval_fraction=0.0)
    return out


def arithmetic_records(n: int = 40) -> list[dict]:
    return [{"prompt": f"Q: {a} plus {b}?\nA:", "completion": f" {a + b}"}
            for a, b in ((i % 7 + 1, i % 5 + 2) for i in range(n))]


def jsonl(records) -> bytes:
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode()


class Stack:
    """The API server (and, on demand, workers and an inference server) as real processes."""

    def __init__(self, tmp: Path, redis_url: str, base: Path):
        self.tmp, self.redis_url, self.base = tmp, redis_url, base
        self.store = tmp / "store"
        self.store.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "LMSTACK_REDIS_URL": redis_url, "LMSTACK_MODELS": f"tiny={base}",
                    "LMSTACK_MODEL_STORE": str(self.store), "LMSTACK_TORCH_THREADS": "1",
                    "LMSTACK_LOG_LEVEL": "INFO", "LMSTACK_GRACE_PERIOD_S": "1", "PYTHONPATH": str(ROOT)}
        self.port = free_port()
        self.api = self.spawn("api", ["services.finetune", "--port", str(self.port)])
        self.client = FineTuneClient(f"127.0.0.1:{self.port}")
        Client(f"127.0.0.1:{self.port}").wait_ready(timeout=60)

    def spawn(self, name: str, args: list[str], **env) -> subprocess.Popen:
        log = open(self.tmp / f"{name}-{len(self.procs)}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env={**self.env, **env},
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def worker(self, reclaim_idle_s: float = 30.0, metrics_port: int = 0, **env) -> subprocess.Popen:
        return self.spawn("worker", ["services.finetune.worker"], LMSTACK_RECLAIM_IDLE_S=str(reclaim_idle_s),
                          LMSTACK_METRICS_PORT=str(metrics_port), **env)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        self.client.close()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def stack(tmp_path, redis_server, base_model):
    s = Stack(tmp_path, redis_server.url, base_model)
    yield s
    s.close()
    print(s.logs())  # pytest shows captured output only when the test failed


def events_of(client: FineTuneClient, job_id: str, timeout: float = 180.0) -> list[pb.JobEvent]:
    return list(client.watch_job(job_id, timeout=timeout))


def statuses(events) -> list[str]:
    return [status_name(e.status) for e in events if e.type == pb.JOB_EVENT_TYPE_STATUS]


SUCCEEDED = 'lmstack_finetune_worker_jobs_total{outcome="succeeded"}'


def worker_metrics(port: int, until=lambda m: True, timeout: float = 60.0) -> dict[str, float]:
    """A worker's /metrics as {'name{label="value"}': value}, polled until ``until(metrics)`` (the
    worker counts a job's end just after recording it in Redis, where the test saw it)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout
    while True:
        out = {}
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                    out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        except OSError:  # still starting its server
            pass
        if (out and until(out)) or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


# --- the whole loop --------------------------------------------------------------------------------------
def test_upload_train_watch_and_serve_the_result(stack):
    from lmcore import load_model
    from lmcore.lora import load_adapter_model
    from lmcore.training import RecordDataset
    from lmcore.training.data import read_records
    from lmcore.training.trainer import evaluate_loss

    ft = stack.client
    # The inference service is up before any fine-tune exists: results must appear without a restart.
    port = free_port()
    stack.spawn("inference", ["services.inference", "--port", str(port), "--models", f"tiny={stack.base}",
                              "--model-store", str(stack.store)])
    data = jsonl(arithmetic_records())
    ds = ft.upload_dataset(data, filename="sums.jsonl", chunk_bytes=100)  # lines cross chunk boundaries
    assert ds.examples == 40 and ds.tokens > 200 and ds.model == "tiny" and ds.id.startswith("ds-")
    stack.worker()
    lora = ft.create_job("tiny", ds.id, method="LORA", max_steps=40, learning_rate=3e-2, batch_size=8,
                         lora_rank=4, lora_target_modules=["all"], suffix="sums", log_interval=5)
    full = ft.create_job("tiny", ds.id, method="FULL", max_steps=12, learning_rate=3e-3, suffix="sums-full")
    assert lora.status == pb.JOB_STATUS_QUEUED and lora.total_steps == 40

    events = events_of(ft, lora.id)
    assert statuses(events) == ["queued", "running", "succeeded"]
    kinds = {pb.JobEventType.Name(e.type) for e in events}
    assert {"JOB_EVENT_TYPE_METRICS", "JOB_EVENT_TYPE_EVAL", "JOB_EVENT_TYPE_CHECKPOINT"} <= kinds
    metrics = [e.metrics for e in events if e.type == pb.JOB_EVENT_TYPE_METRICS]
    assert metrics[-1].step == 40 and metrics[-1].tokens_per_second > 0 and metrics[-1].learning_rate > 0
    job = ft.get_job(lora.id)
    name = job.fine_tuned_model
    assert name == f"ft:tiny:sums:{lora.id.removeprefix('ftjob-')}" and events[-1].fine_tuned_model == name
    assert job.trained_tokens > 0 and job.HasField("finished_at") and job.HasField("eval_loss")
    assert job.hyperparameters.lora_target_modules == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    # By default a finished job leaves only its final weights (checkpoints_kept_after_finish: 0).
    assert list(ft.list_checkpoints(lora.id)) == [] and not (stack.store / ".checkpoints" / lora.id).exists()
    import redis as redis_py

    assert redis_py.Redis.from_url(stack.redis_url).ttl(f"lmstack:ft:job:{lora.id}") > 0  # finished_job_ttl_s
    assert ft.get_dataset(ds.id).examples == 40
    resumed = list(ft.watch_job(lora.id, after_event_id=events[-2].id))  # resume a watch where it left off
    assert [e.id for e in resumed] == [events[-1].id]

    # The adapter names its base and, on the training data, clearly beats the base model.
    adapter_dir = stack.store / name
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model"] == "tiny"
    base = load_model(stack.base)
    dataset = RecordDataset.from_records(read_records(data.decode().splitlines()), base.tokenizer, 128)
    tuned = load_adapter_model(base, adapter_dir)
    base_loss, tuned_loss = evaluate_loss(base, dataset), evaluate_loss(tuned, dataset)
    # nats per completion token: 0.8-1.1 measured (the base is trained on lmcore's own source, which
    # changes with every commit); an adapter that learned nothing is ~0.
    assert tuned_loss < base_loss - 0.5, (base_loss, tuned_loss)

    full_job = ft.wait(full.id)
    assert full_job.status == pb.JOB_STATUS_SUCCEEDED
    assert load_model(stack.store / full_job.fine_tuned_model).tokenizer is not None

    # The running inference service now lists and serves both results by name.
    with Client(f"127.0.0.1:{port}") as c:
        c.wait_ready(timeout=90)
        served = {m.name for m in c.list_models()}
        assert {name, full_job.fine_tuned_model} <= served
        out = c.complete("Q: 3 plus 4?\nA:", model=name, max_tokens=3, temperature=0)
        assert out.usage.completion_tokens >= 1


# --- crash safety --------------------------------------------------------------------------------------
def test_killed_worker_job_is_resumed_by_another_with_identical_weights(stack):
    """kill -9 the worker three times, at random steps of one job: one SUCCEEDED, and the weights
    are bit-identical to an uninterrupted run."""
    import random

    ft = stack.client
    ds = ft.upload_dataset(jsonl(arithmetic_records(64)))
    hp = dict(max_steps=80, learning_rate=1e-2, batch_size=8, lora_rank=4, checkpoint_interval=10,
              log_interval=1, lora_dropout=0.1, seed=7)
    job = ft.create_job("tiny", ds.id, method="LORA", suffix="crash", **hp)
    kills = sorted(random.Random(time.time_ns()).sample(range(10, 80, 10), 3))  # checkpoint steps
    after = ""
    for kill_at in kills:
        victim = stack.worker(reclaim_idle_s=1.5)
        running = False  # only this attempt's checkpoints count (the previous worker is dead)
        for event in ft.watch_job(job.id, after_event_id=after, timeout=300):
            after = event.id
            running = running or (event.type == pb.JOB_EVENT_TYPE_STATUS and event.status == pb.JOB_STATUS_RUNNING)
            if running and event.type == pb.JOB_EVENT_TYPE_CHECKPOINT and event.checkpoint.step >= kill_at:
                victim.send_signal(signal.SIGKILL)
                break
        victim.wait()
    killed_at = ft.get_job(job.id)
    assert killed_at.status == pb.JOB_STATUS_RUNNING and killed_at.step < 80, (kills, killed_at)

    metrics_port = free_port()
    stack.worker(reclaim_idle_s=1.5, metrics_port=metrics_port)
    events = events_of(ft, job.id, timeout=300)
    assert statuses(events).count("succeeded") == 1 and statuses(events)[-1] == "succeeded"
    resumed = [e for e in events if e.type == pb.JOB_EVENT_TYPE_INFO and "resumed from the checkpoint" in e.message]
    assert len(resumed) == 3, kills
    done = ft.get_job(job.id)
    assert done.attempt == 4
    scraped = worker_metrics(metrics_port, until=lambda m: m.get(SUCCEEDED) == 1)
    assert scraped["lmstack_finetune_worker_jobs_reclaimed_total"] == 1  # taken over from the dead worker
    assert scraped[SUCCEEDED] == 1
    assert scraped['lmstack_finetune_worker_job_duration_seconds_count{outcome="succeeded"}'] == 1

    # The same job, uninterrupted, on the surviving worker: the same adapter, bit for bit.
    again = ft.wait(ft.create_job("tiny", ds.id, method="LORA", suffix="clean", **hp).id)
    assert again.status == pb.JOB_STATUS_SUCCEEDED and again.attempt == 1
    a, b = adapter_tensors(stack.store / done.fine_tuned_model), adapter_tensors(stack.store / again.fine_tuned_model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stopped_worker_hands_its_job_back_and_another_resumes_it(stack):
    ft = stack.client
    ds = ft.upload_dataset(jsonl(arithmetic_records(16)))
    first = stack.worker()
    job = ft.create_job("tiny", ds.id, max_steps=60, log_interval=1, checkpoint_interval=1000)
    for event in ft.watch_job(job.id, timeout=120):
        if event.type == pb.JOB_EVENT_TYPE_METRICS and event.metrics.step >= 3:
            break
    first.send_signal(signal.SIGTERM)  # a deploy: stop after this step, checkpoint, requeue
    assert first.wait(timeout=60) == 0
    handed_back = ft.get_job(job.id)
    assert handed_back.status == pb.JOB_STATUS_QUEUED and 3 <= handed_back.step < 60
    metrics_port = free_port()
    stack.worker(metrics_port=metrics_port)
    events = events_of(ft, job.id)
    assert statuses(events) == ["queued", "running", "queued", "running", "succeeded"]
    resumed = [e for e in events if e.type == pb.JOB_EVENT_TYPE_INFO and "resumed" in e.message]
    assert len(resumed) == 1 and f"step {handed_back.step}" in resumed[0].message
    assert ft.get_job(job.id).attempt == 2
    scraped = worker_metrics(metrics_port, until=lambda m: m.get(SUCCEEDED) == 1)
    assert scraped[SUCCEEDED] == 1
    assert scraped["lmstack_finetune_worker_jobs_reclaimed_total"] == 0  # handed back, not taken over


def test_redis_restart_loses_no_queued_job(stack, redis_server):
    """kill -9 Redis while one job runs and three wait behind it, call the API at once: it answers,
    and all four succeed."""
    ft = stack.client
    ds = ft.upload_dataset(jsonl(arithmetic_records(12)))
    stack.worker()
    running = ft.create_job("tiny", ds.id, method="LORA", max_steps=120, log_interval=1, seed=9)
    ids = [ft.create_job("tiny", ds.id, method="LORA", max_steps=3, seed=i).id for i in range(3)]
    for event in ft.watch_job(running.id, timeout=120):
        if event.type == pb.JOB_EVENT_TYPE_METRICS and event.metrics.step >= 3:
            break
    redis_server.kill()  # kill -9: appendonly (fsync always) brings back the jobs, the queue and the dataset
    redis_server.start()
    assert ft.get_job(ids[0]).status == pb.JOB_STATUS_QUEUED  # at once: the API's retries ride it out
    assert [j.id for j in ft.list_jobs(statuses=["queued"]).jobs] == ids[::-1]
    finished = [ft.wait(i, timeout=180) for i in [running.id, *ids]]
    assert [j.status for j in finished] == [pb.JOB_STATUS_SUCCEEDED] * 4, [j.error.message for j in finished]
    assert len({j.fine_tuned_model for j in finished}) == 4
    assert finished[0].step == 120


def test_cancel_queued_and_running_jobs(stack):
    ft = stack.client
    ds = ft.upload_dataset(jsonl(arithmetic_records(16)))
    queued = ft.create_job("tiny", ds.id, max_steps=5)
    cancelled = ft.cancel_job(queued.id)
    assert cancelled.status == pb.JOB_STATUS_CANCELLED
    assert ft.cancel_job(queued.id).status == pb.JOB_STATUS_CANCELLED  # idempotent

    stack.worker()
    running = ft.create_job("tiny", ds.id, max_steps=100_000, log_interval=1, checkpoint_interval=1000)
    for event in ft.watch_job(running.id, timeout=120):
        if event.type == pb.JOB_EVENT_TYPE_METRICS and event.metrics.step >= 3:
            break
    at_cancel = ft.cancel_job(running.id)
    assert at_cancel.cancel_requested
    final = ft.wait(running.id, timeout=60)
    assert final.status == pb.JOB_STATUS_CANCELLED and final.HasField("finished_at")
    assert final.step <= at_cancel.step + 2, (at_cancel.step, final.step)  # within one optimizer step (+ lag)
    assert not final.fine_tuned_model

    # The queued-then-cancelled job never started, even with a worker now consuming the queue.
    time.sleep(0.5)
    never = ft.get_job(queued.id)
    assert never.status == pb.JOB_STATUS_CANCELLED and never.attempt == 0 and not never.HasField("started_at")
    with pytest.raises(grpc.RpcError) as e:
        ft.cancel_job("ftjob-000000000000")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# --- validation ----------------------------------------------------------------------------------------
BAD_DATASETS = [
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n{"prompt": "x"\n', "line 3: not valid JSON"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', 'line 2: missing field "completion"'),
    (b"\n\n", "empty"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "' + b"word " * 300 + b'"}\n',
     "line 2: record is"),
    (b'{"prompt": "a", "completion": "\xff"}\n', "line 1: not valid UTF-8"),
    (b'{"prompt": "a", "completion": "b"}\n[1, 2]', "line 2: expected a JSON object"),  # no final newline
]


def test_bad_datasets_are_rejected_naming_the_line(stack, redis_server):
    import redis

    for body, needle in BAD_DATASETS:
        with pytest.raises(grpc.RpcError) as e:
            stack.client.upload_dataset(body, chunk_bytes=16)  # lines cross chunk boundaries
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details(), e.value.details()
        assert e.value.details().startswith("invalid dataset: ")  # the boundary's DatasetError mapping
    r = redis.Redis.from_url(redis_server.url)
    assert not r.keys("lmstack:ft:ds:*")  # nothing stored from a rejected upload


def test_redis_outage_during_upload_is_unavailable_and_nothing_is_half_stored(stack, redis_server):
    """The client-streamed UploadDataset goes through the same error boundary as the unary RPCs."""
    import redis

    body = jsonl(arithmetic_records(6))
    redis_server.stop()
    with pytest.raises(grpc.RpcError) as e:
        stack.client.upload_dataset(body, chunk_bytes=64, timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    assert e.value.details().startswith("the job store (Redis) is unavailable, retry shortly: ")
    redis_server.start()
    assert not redis.Redis.from_url(redis_server.url).keys("lmstack:ft:ds:*")
    for _ in range(50):  # the API reconnects on its own
        try:
            assert stack.client.upload_dataset(body, chunk_bytes=64).examples == 6
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            time.sleep(0.2)
    else:
        raise AssertionError("the upload never succeeded after Redis came back")


def test_bad_requests_get_clear_errors_and_idempotency_is_honoured(stack, redis_server):
    ft = stack.client
    ds = ft.upload_dataset(jsonl(arithmetic_records(10)))
    bad = [
        (dict(learning_rate=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "learning_rate"),
        (dict(lora_rank=0), grpc.StatusCode.INVALID_ARGUMENT, "lora_rank"),
        (dict(lora_target_modules=["q_proj"]), grpc.StatusCode.INVALID_ARGUMENT, "q_proj"),
        (dict(batch_size=0), grpc.StatusCode.INVALID_ARGUMENT, "batch_size"),
        (dict(eval_fraction=0.9), grpc.StatusCode.INVALID_ARGUMENT, "eval_fraction"),
        (dict(method="FULL", lora_rank=4), grpc.StatusCode.INVALID_ARGUMENT, "LORA only"),
        (dict(method="FULL", merge_lora=True), grpc.StatusCode.INVALID_ARGUMENT, "merge_lora"),
        (dict(suffix="Bad Suffix!"), grpc.StatusCode.INVALID_ARGUMENT, "suffix"),
        (dict(base_model="nope"), grpc.StatusCode.NOT_FOUND, "available: ['tiny'"),
        (dict(dataset_id="ds-000000000000"), grpc.StatusCode.NOT_FOUND, "dataset"),
    ]
    for kw, code, needle in bad:
        args = {"base_model": "tiny", "dataset_id": ds.id, **kw}
        with pytest.raises(grpc.RpcError) as e:
            ft.create_job(args.pop("base_model"), args.pop("dataset_id"), **args)
        assert e.value.code() == code and needle in e.value.details(), (kw, e.value.details())

    first = ft.create_job("tiny", ds.id, max_steps=2, idempotency_key="nightly-42")
    again = ft.create_job("tiny", ds.id, max_steps=2, idempotency_key="nightly-42")
    other = ft.create_job("tiny", ds.id, max_steps=2, idempotency_key="nightly-43")
    assert first.id == again.id != other.id
    listed = ft.list_jobs()
    assert [j.id for j in listed.jobs] == [other.id, first.id]  # newest first, no duplicate
    page1 = ft.list_jobs(page_size=1)
    page2 = ft.list_jobs(page_size=1, page_token=page1.next_page_token)
    assert [page1.jobs[0].id, page2.jobs[0].id] == [other.id, first.id] and not page2.next_page_token
    ft.cancel_job(other.id)
    assert [j.id for j in ft.list_jobs(statuses=["cancelled"]).jobs] == [other.id]
    assert [j.id for j in ft.list_jobs(statuses=["queued"]).jobs] == [first.id]
    # Without Redis the API answers UNAVAILABLE, and recovers when Redis is back.
    redis_server.stop()
    with pytest.raises(grpc.RpcError) as e:
        ft.get_job(first.id, timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "Redis" in e.value.details()
    redis_server.start()
    assert ft.get_job(first.id).id == first.id


def test_lmstack_finetune_cli(stack, tmp_path, capsys):
    from services.cli import main

    addr = ["finetune", "--addr", f"127.0.0.1:{stack.port}"]
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(arithmetic_records(12)))
    stack.worker(LMSTACK_CHECKPOINTS_KEPT_AFTER_FINISH="1")  # keep the newest checkpoint to list it below
    code = main([*addr, "create", "--model", "tiny", "--dataset", str(data), "--max-steps", "4", "--suffix", "cli",
                 "--lora-targets", "c_attn,mlp", "--watch"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "uploaded" in out and "succeeded: ft:tiny:cli:" in out and "fine-tuned model: ft:tiny:cli:" in out
    job_id = next(w for w in out.split() if w.startswith("ftjob-"))
    assert main([*addr, "list", "--status", "succeeded"]) == 0 and job_id in capsys.readouterr().out
    out = (main([*addr, "checkpoints", job_id]), capsys.readouterr().out)
    assert out[0] == 0 and len([line for line in out[1].splitlines() if "step" in line]) == 1, out
    assert (stack.store / f"ft:tiny:cli:{job_id.removeprefix('ftjob-')}" / "adapter_config.json").is_file()
    code = main([*addr, "create", "--model", "tiny", "--dataset", str(data), "--max-steps", "2", "--suffix", "merged",
                 "--merge", "--watch"])
    merged = next(w for w in capsys.readouterr().out.split() if w.startswith("ft:tiny:merged:"))
    assert code == 0 and (stack.store / merged / "config.json").is_file()  # a full model, no adapter
    assert not (stack.store / merged / "adapter_config.json").exists()
    assert main([*addr, "get", job_id]) == 0 and '"JOB_STATUS_SUCCEEDED"' in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1, "completion": "b"}\n')
    assert main([*addr, "upload", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "INVALID_ARGUMENT" in err and "line 2" in err
    assert main([*addr, "cancel", job_id]) == 1 and "FAILED_PRECONDITION" in capsys.readouterr().err
    assert main(["finetune", "--addr", f"127.0.0.1:{free_port()}", "--timeout", "2", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the fine-tuning service" in err


def test_api_keys_guard_every_rpc_including_the_client_streamed_upload(tmp_path, redis_server, base_model):
    env = {**os.environ, "LMSTACK_REDIS_URL": redis_server.url, "LMSTACK_MODELS": f"tiny={base_model}",
           "LMSTACK_MODEL_STORE": str(tmp_path), "LMSTACK_API_KEYS": "s3cret", "LMSTACK_GRACE_PERIOD_S": "1"}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.finetune", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        Client(f"127.0.0.1:{port}").wait_ready(timeout=60)  # health stays open without a key
        for key, expected in ((None, "missing API key"), ("wrong", "invalid API key")):
            anon = FineTuneClient(f"127.0.0.1:{port}", api_key=key)
            for call in (lambda c: c.upload_dataset(jsonl(arithmetic_records(4))), lambda c: c.list_jobs()):
                with pytest.raises(grpc.RpcError) as e:
                    call(anon)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert expected in e.value.details()
            anon.close()
        authed = FineTuneClient(f"127.0.0.1:{port}", api_key="s3cret")
        assert authed.upload_dataset(jsonl(arithmetic_records(4))).examples == 4
        authed.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
