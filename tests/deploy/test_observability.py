"""Observability proven: `lmstack serve` scraped by a real Prometheus, every dashboard query showing data,
a real alert going pending, firing and resolving, and scrapes that stay clean.

One ``lmstack serve`` (free ports, its own Redis) and one ``prometheus`` (1 s scrape and evaluation
intervals, the jobs of ``deploy/prometheus/prometheus.yml`` pointed at serve's metrics ports, the
alert rules of ``deploy/prometheus/alerts.yml`` with a short ``for:`` on the no-worker rule) serve
the whole module. The ``traffic`` fixture drives what an operator's panels show: unary and streamed
completions, a cancelled stream, a bad request, tokenizer calls, two requests sharing a prefix, and
two fine-tuning jobs. While the first job runs, the worker is frozen (SIGSTOP, so the supervisor
does not restart it) and the second job waits in the queue: the running job's gauges are scraped
and the no-worker alert must go pending then firing; after SIGCONT both jobs finish and the alert
resolves. Nothing here asserts a duration: every wait polls Prometheus until the data is there.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lmcore.engine.stats import FINISH_REASONS
from tests.helpers import ROOT, free_port
from tests.helpers.prometheus import PrometheusServer, dashboard_targets, in_ci, prometheus_binary, substitute

LMSTACK = [sys.executable, "-m", "services.cli"]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
RECLAIM_IDLE_S = 3  # a frozen worker counts as dead after this long (LMSTACK_RECLAIM_IDLE_S)
NO_WORKER_FOR = "3s"  # the test copy's `for:` of LmstackFinetuneNoWorker (2m in alerts.yml)
RATE_INTERVAL = "15s"  # what Grafana's $__rate_interval becomes at a 1 s scrape interval, with slack
BANNER = re.compile(r"^\s+(\S+)\s.*?(?:metrics http://[\d.]+:(\d+)/metrics)?\s+\(pid (\d+)\)\s*$")


def metrics_base_port(n: int = 4) -> int:
    """A first port such that it and the next n - 1 are free (serve's metrics ports are consecutive)."""
    from services.ports import PortInUse, check_port_free

    for _ in range(50):
        base = free_port()
        try:
            for p in range(base, base + n):
                check_port_free("metrics", "127.0.0.1", p)
            return base
        except (PortInUse, ValueError):
            continue
    raise RuntimeError("no run of free ports found")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def sample_value(port: int, name: str, **labels) -> float:
    return sum(s.value for s in samples(scrape(port)) if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items()))


def test_rules_copy(tmp_path) -> None:
    """The copy of the rules this module loads differs from alerts.yml only in one `for:`."""
    path = write_rules_copy(tmp_path)
    original = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    copy = yaml.safe_load(path.read_text())
    changed = [(a["alert"], a["for"], b["for"]) for ga, gb in zip(original["groups"], copy["groups"])
               for a, b in zip(ga["rules"], gb["rules"]) if a != b]
    assert changed == [("LmstackFinetuneNoWorker", "2m", NO_WORKER_FOR)]


def write_rules_copy(tmp) -> os.PathLike:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "LmstackFinetuneNoWorker":
                rule["for"] = NO_WORKER_FOR
    path = tmp / "alerts.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


# --- the stack ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    prometheus_binary("prometheus")
    prometheus_binary("promtool")
    if shutil.which("redis-server") is None:
        (pytest.fail if in_ci() else pytest.skip)("redis-server not installed (apt-get install redis-server)")
    tmp = tmp_path_factory.mktemp("observability")
    data = tmp / "data"
    ports = {"inference": free_port(), "tokenizer": free_port(), "finetune": free_port()}
    proc = subprocess.Popen(
        [*LMSTACK, "serve", "--data-dir", str(data), "--metrics-port", str(metrics_base_port()),
         "--inference-port", str(ports["inference"]), "--tokenizer-port", str(ports["tokenizer"]),
         "--finetune-port", str(ports["finetune"]), "--http-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "LMSTACK_RECLAIM_IDLE_S": str(RECLAIM_IDLE_S)})
    lines = []
    for line in proc.stdout:  # blocks until the supervisor prints or exits (it gives up after 120 s)
        lines.append(line)
        if line.startswith("logs:"):
            break
    if proc.poll() is not None or not any("lmstack is serving" in ln for ln in lines):
        proc.kill()
        logs = "".join((data / "logs" / f).read_text()[-2000:] for f in os.listdir(data / "logs"))
        pytest.fail("lmstack serve did not come up:\n" + "".join(lines) + logs)
    prom = None
    children = {}
    try:  # a failed setup still stops serve (a leaked one would hold default ports for later tests)
        for line in lines:
            m = BANNER.match(line)
            if m:
                children[m.group(1)] = SimpleNamespace(metrics_port=int(m.group(2) or 0), pid=int(m.group(3)))
        # Prometheus scrapes the jobs deploy/prometheus/prometheus.yml defines; each target's host is
        # the compose service, i.e. the name of serve's child with the same command.
        deploy = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
        jobs = {job["job_name"]: [f"127.0.0.1:{children[t.split(':')[0]].metrics_port}"
                                  for cfg in job["static_configs"] for t in cfg["targets"]]
                for job in deploy["scrape_configs"]}
        prom = PrometheusServer(tmp, jobs, [write_rules_copy(tmp)]).start()
        # Every target scraped once before any traffic: a counter first seen already moved shows no rate.
        prom.wait_for(f'count(up{{job=~"lmstack-.*"}} == 1) == {len(jobs)}')
        s = SimpleNamespace(addrs={k: f"127.0.0.1:{p}" for k, p in ports.items()}, children=children, prom=prom,
                            data=data, started=time.time())
        yield s
    finally:
        if "worker" in children:
            try:
                os.kill(children["worker"].pid, signal.SIGCONT)  # never leave it frozen
            except ProcessLookupError:
                pass
        if prom is not None:
            prom.stop()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def records(n: int = 20) -> bytes:
    rows = [{"prompt": f"def add_{i}(a, b):\n", "completion": f"    return a + b + {i}\n"} for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def finite_values(result: list[dict]) -> list[float]:
    return [float(v) for series in result for _, v in series["values"] if math.isfinite(float(v))]


def alert_state(prom: PrometheusServer, name: str) -> str:
    states = [a["state"] for a in prom.alerts() if a["labels"]["alertname"] == name]
    return states[0] if states else "inactive"


@pytest.fixture(scope="module")
def traffic(stack):
    """Drive every kind of traffic the dashboards chart; returns what the tests compare against."""
    from lmcore import EngineConfig
    from services.client import Client
    from services.finetune.client import FineTuneClient
    from services.gen.lmstack.v1 import finetune_pb2 as pb

    out = SimpleNamespace()
    prom, metrics = stack.prom, stack.children["inference"].metrics_port
    with Client(stack.addrs["inference"]) as inf, Client(stack.addrs["tokenizer"]) as tok:
        inf.complete("def main():\n", max_tokens=8, temperature=0)
        assert list(inf.complete_stream("import os\n", max_tokens=8, temperature=0))
        stream = inf.complete_stream("class Tree:\n", max_tokens=200, ignore_eos=True)
        next(stream)
        stream.cancel()
        with pytest.raises(grpc.RpcError) as bad:
            inf.complete("x", max_tokens=10**6)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        text = "def observability(panel, alert):\n    return panel + alert\n"
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.count_tokens(text) == len(ids)
        tok.encode_batch([text, "x = 1\n"])

        # Two requests sharing a prefix: the second reuses the first's cached blocks.
        shared = tok.encode("# the monitoring test's shared prefix: " + " ".join(f"p{i}" for i in range(40)) + "\n")
        first, second = shared + tok.encode("def first():\n"), shared + tok.encode("def second():\n")
        common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        block = EngineConfig().prefix_block_size  # the service's engines use the default config
        out.expected_hits = block * (min(common, len(first) - 1, len(second) - 1) // block)
        assert out.expected_hits >= 2 * block
        before = sample_value(metrics, "lmstack_inference_prefix_cache_hit_tokens_total")
        inf.complete(first, max_tokens=2, temperature=0)
        inf.complete(second, max_tokens=2, temperature=0)
        out.hits = sample_value(metrics, "lmstack_inference_prefix_cache_hit_tokens_total") - before

    ft = FineTuneClient(stack.addrs["finetune"])
    worker = stack.children["worker"]
    try:
        ds = ft.upload_dataset(records(), filename="adds.jsonl")
        job = ft.create_job("pycode", ds.id, method="LORA", max_steps=30, batch_size=4, lora_rank=4,
                            eval_interval=2, log_interval=1, learning_rate=1e-3)
        out.job_id = job.id
        # Freeze the worker right after the job's first held-out evaluation.
        call = ft.stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=300, metadata=ft.metadata)
        for event in call:
            if event.type == pb.JOB_EVENT_TYPE_EVAL:
                os.kill(worker.pid, signal.SIGSTOP)
                break
        call.cancel()
        assert ft.get_job(job.id).status == pb.JOB_STATUS_RUNNING
        queued = ft.create_job("pycode", ds.id, method="LORA", max_steps=2, batch_size=4, lora_rank=4)
        out.queued_id = queued.id
        running = f'{{job_id="{job.id}"}}'
        for name in ("train_loss", "eval_loss", "step", "total_steps", "learning_rate", "tokens_per_second"):
            prom.wait_for(f"lmstack_finetune_job_{name}{running}")
        out.scrape_while_running = scrape(stack.children["finetune"].metrics_port)
        out.alert_states = []
        deadline = time.monotonic() + 120
        while "firing" not in out.alert_states and time.monotonic() < deadline:
            state = alert_state(prom, "LmstackFinetuneNoWorker")
            if not out.alert_states or out.alert_states[-1] != state:
                out.alert_states.append(state)
            time.sleep(0.2)
        os.kill(worker.pid, signal.SIGCONT)
        out.final = {j: ft.wait(j, timeout=300) for j in (job.id, queued.id)}
        out.events = list(ft.watch_job(job.id, timeout=60))
        deadline = time.monotonic() + 120
        while alert_state(prom, "LmstackFinetuneNoWorker") != "inactive" and time.monotonic() < deadline:
            time.sleep(0.5)
        out.alert_states.append(alert_state(prom, "LmstackFinetuneNoWorker"))
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        ft.close()
    # Both jobs' ends scraped from the worker, and the API no longer reporting the running job.
    prom.wait_for('sum(lmstack_finetune_worker_jobs_total{outcome="succeeded"}) >= 2')
    prom.wait_for(f'absent(lmstack_finetune_job_step{{job_id="{out.job_id}"}})')
    out.ended = time.time()
    return out


# --- the tests -------------------------------------------------------------------------------------------
def test_both_fine_tuning_jobs_succeeded(traffic):
    from services.gen.lmstack.v1 import finetune_pb2 as pb

    assert {j: r.status for j, r in traffic.final.items()} == dict.fromkeys(traffic.final, pb.JOB_STATUS_SUCCEEDED)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_dashboard_query_returns_data(stack, traffic, path):
    """Each target over the module's time range, as the panel would chart it, until it has a finite
    value (the last events may need a scrape or two more)."""
    dash = json.loads(path.read_text())
    span = f"{int(time.time() - stack.started) + 120}s"
    pending = [(panel["title"], target["refId"], substitute(target["expr"], dash, RATE_INTERVAL, span))
               for panel, target in dashboard_targets(dash)]
    deadline = time.monotonic() + 90
    while pending and time.monotonic() < deadline:
        pending = [(title, ref, expr) for title, ref, expr in pending
                   if not finite_values(stack.prom.query_range(expr, stack.started, time.time()))]
        if pending:
            time.sleep(1)
    assert not pending, "dashboard queries without data:\n" + "\n".join(f"{t!r} {r}: {e}" for t, r, e in pending)


def test_training_loss_panel_shows_the_jobs_loss(stack, traffic):
    from services.gen.lmstack.v1 import finetune_pb2 as pb

    losses = [e.metrics.loss for e in traffic.events if e.type == pb.JOB_EVENT_TYPE_METRICS]
    evals = [e.eval_loss for e in traffic.events if e.type == pb.JOB_EVENT_TYPE_EVAL]
    dash = json.loads((ROOT / "deploy/grafana/dashboards/lmstack-training.json").read_text())
    panels = {p["title"]: p for p in dash["panels"]}
    for title, reported in (("Training loss per job", losses), ("Held-out loss per job", evals)):
        expr = panels[title]["targets"][0]["expr"]
        series = {s["metric"]["job_id"]: s["values"] for s in stack.prom.query_range(expr, stack.started, time.time())}
        assert traffic.job_id in series, (title, series.keys())
        seen = [float(v) for _, v in series[traffic.job_id]]
        assert seen and all(any(math.isclose(v, r, rel_tol=1e-6) for r in reported) for v in seen), (title, seen, reported)
    # The queued job never ran while frozen: it has no running-job series from then.
    assert f'job_id="{traffic.queued_id}"' not in traffic.scrape_while_running
    assert f'job_id="{traffic.job_id}"' in traffic.scrape_while_running


def test_cache_panels_show_the_prefix_hits_of_two_requests_sharing_a_prefix(stack, traffic):
    assert traffic.hits == traffic.expected_hits
    dash = json.loads((ROOT / "deploy/grafana/dashboards/lmstack.json").read_text())
    panels = {p["title"]: p for p in dash["panels"]}
    for title in ("Prefix-cache hit rate (tokens)", "Prefix-cache tokens / s"):
        target = panels[title]["targets"][-1]  # the hit rate; the hit tokens per second
        expr = substitute(target["expr"], dash, RATE_INTERVAL, "1h")
        values = finite_values(stack.prom.query_range(expr, stack.started, time.time()))
        assert any(v > 0 for v in values), (title, expr)
    hits = stack.prom.query("max_over_time(lmstack_inference_prefix_cache_hit_tokens_total[1h])")
    assert hits and max(float(s["value"][1]) for s in hits) >= traffic.expected_hits


def test_no_worker_alert_goes_pending_then_firing_and_resolves(traffic):
    states = traffic.alert_states
    assert states[-1] == "inactive", states  # resolved once the worker came back
    assert "pending" in states and "firing" in states, states
    assert states.index("pending") < states.index("firing"), states


def test_scrapes_parse_with_no_duplicate_series_and_bounded_labels(stack, traffic):
    import grpc as grpc_module

    codes = {c.name for c in grpc_module.StatusCode}
    for name, child in stack.children.items():
        if not child.metrics_port:
            continue
        text = scrape(child.metrics_port)
        seen = set()
        for s in samples(text):
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in seen, f"{name}: duplicate series {key}"
            seen.add(key)
            assert "job_id" not in s.labels, f"{name}: a job id label outlived its job: {s}"
            assert "request_id" not in s.labels, f"{name}: per-request label {s}"
            if "code" in s.labels:
                assert s.labels["code"] in codes, s
            if "finish_reason" in s.labels:
                assert s.labels["finish_reason"] in FINISH_REASONS, s
            if "adapter" in s.labels:
                assert s.labels["adapter"] == "" or s.labels["adapter"].startswith("ft:"), s
        assert seen, name
