"""Prometheus metrics, named ``lmstack_<component>_<what>_<unit>``; latencies are histograms.

Each server owns a ``CollectorRegistry`` (not the process-global one), so several servers can run
in one process (tests, benchmarks) without name clashes; ``services.server.GrpcServer`` exposes it
on ``--metrics-port`` at ``/metrics``.

* ``RpcMetrics(component)``: every server. ``lmstack_<component>_rpc_requests_total{method,code}``
  and ``lmstack_<component>_rpc_latency_seconds{method}``.
* ``InferenceMetrics``: the inference service. Histograms
  ``lmstack_inference_time_to_first_token_seconds``, ``..._time_per_output_token_seconds``,
  ``..._request_latency_seconds``; counters ``..._prompt_tokens_total``,
  ``..._generation_tokens_total``, ``..._requests_aborted_total``; gauges (read from each engine at
  scrape time) ``..._running_requests`` and ``..._queue_depth_requests``, all labelled by model.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

# From 1 ms (a tokenizer round trip) to a minute (a long completion on a CPU).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)


class RpcMetrics:
    """Per-RPC request counts (by status code) and latencies, recorded by the error boundary."""

    def __init__(self, component: str, registry: CollectorRegistry):
        self.requests = Counter(f"lmstack_{component}_rpc_requests", "RPCs handled, by method and status code",
                                ["method", "code"], registry=registry)
        self.latency = Histogram(f"lmstack_{component}_rpc_latency_seconds", "RPC latency, by method",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=registry)

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)


class InferenceMetrics:
    """Generation metrics by model (vLLM's set): TTFT, TPOT, end-to-end latency, tokens, queue."""

    def __init__(self, registry: CollectorRegistry, model_registry=None):
        p = "lmstack_inference"
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Time from request to first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds", "Mean time between generated tokens "
                              "of a request (after the first)", ["model"], buckets=TOKEN_TIME_BUCKETS,
                              registry=registry)
        self.latency = Histogram(f"{p}_request_latency_seconds", "Time from request to last token",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens processed", ["model"],
                                     registry=registry)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Tokens generated", ["model"],
                                         registry=registry)
        self.aborted = Counter(f"{p}_requests_aborted", "Requests stopped early (client cancel, deadline, "
                               "disconnect)", ["model"], registry=registry)
        if model_registry is not None:
            registry.register(_EngineGauges(model_registry))

    def finished(self, model: str, start: float, first: float | None, end: float,
                 prompt_tokens: int, completion_tokens: int) -> None:
        self.latency.labels(model).observe(end - start)
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        if first is not None:
            self.ttft.labels(model).observe(first - start)
            if completion_tokens > 1:
                self.tpot.labels(model).observe((end - first) / (completion_tokens - 1))


class _EngineGauges:
    """Queue depth and running requests, read from every loaded engine when Prometheus scrapes."""

    def __init__(self, model_registry):
        self.model_registry = model_registry

    def collect(self):
        running = GaugeMetricFamily("lmstack_inference_running_requests", "Requests in the running batch",
                                    labels=["model"])
        waiting = GaugeMetricFamily("lmstack_inference_queue_depth_requests", "Requests waiting for a slot",
                                    labels=["model"])
        for entry in self.model_registry.entries():
            r, w = entry.obj.load()
            running.add_metric([entry.name], r)
            waiting.add_metric([entry.name], w)
        yield running
        yield waiting
