"""Prometheus metrics, named ``lmstack_<component>_<what>_<unit>``; latencies are histograms.

Each server owns a ``CollectorRegistry`` (not the process-global one), so several servers can run
in one process (tests, benchmarks) without name clashes; ``services.server.GrpcServer`` exposes it
on ``--metrics-port`` at ``/metrics``. What each metric means for an operator, and the alerts and
dashboards built on them: ``docs/monitoring.md``.

* ``RpcMetrics(component)``: every server. ``lmstack_<component>_rpc_requests_total{method,code}``
  and ``lmstack_<component>_rpc_latency_seconds{method}``.
* ``InferenceMetrics``: the inference service, vLLM's set. Per request (label ``model``, the name
  the request used): histograms ``lmstack_inference_time_to_first_token_seconds``,
  ``..._time_per_output_token_seconds``, ``..._request_latency_seconds``; counters
  ``..._prompt_tokens_total``, ``..._generation_tokens_total``, ``..._requests_aborted_total``.
  From each engine's stats listener (labels ``model``, the engine's model, and ``adapter``, the
  LoRA adapter or ``""``; bounded by the adapters loaded): ``..._requests_finished_total{finish_reason}``
  (length / eos / stop / aborted / error), histograms ``..._request_queue_time_seconds``,
  ``..._request_prefill_time_seconds``, ``..._request_decode_time_seconds``, and per step
  ``..._batch_size_requests`` and ``..._engine_step_duration_seconds``. Read from each engine at
  scrape time: gauges ``..._running_requests``, ``..._queue_depth_requests``,
  ``..._queue_capacity_requests``, ``..._kv_cache_slot_usage_ratio``,
  ``..._kv_cache_token_usage_ratio`` and counters ``..._prefix_cache_query_tokens_total``,
  ``..._prefix_cache_hit_tokens_total``.
* ``TokenizerMetrics``: ``lmstack_tokenizer_tokens_total{model,method}`` and
  ``lmstack_tokenizer_text_bytes_total{model,method}`` (UTF-8 bytes encoded or decoded).

The fine-tuning metrics (queue, jobs, workers) live with their Redis schema in
``services.finetune.metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# From 1 ms (a tokenizer round trip) to a minute (a long completion on a CPU).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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

    def expect(self, methods) -> None:
        """Export these methods' series at 0 before their first call, so that first call is an
        increase Prometheus sees (a series that appears already at 1 shows no rate)."""
        for method in methods:
            self.requests.labels(method, "OK")
            self.latency.labels(method)


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
        labels = ["model", "adapter"]
        self.finished_requests = Counter(f"{p}_requests_finished", "Requests the engine finished, by finish "
                                         "reason (length, eos, stop, aborted, error)", [*labels, "finish_reason"],
                                         registry=registry)
        self.queue_time = Histogram(f"{p}_request_queue_time_seconds", "Time a request waited for a "
                                    "KV-cache slot", labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.prefill_time = Histogram(f"{p}_request_prefill_time_seconds", "Time from a request's admission "
                                      "to its first token (its prompt's computation)", labels,
                                      buckets=LATENCY_BUCKETS, registry=registry)
        self.decode_time = Histogram(f"{p}_request_decode_time_seconds", "Time from a request's first token "
                                     "to its last", labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram(f"{p}_batch_size_requests", "Sequences in one engine step (decoding and "
                                    "prefilling)", ["model"], buckets=BATCH_BUCKETS, registry=registry)
        self.step_time = Histogram(f"{p}_engine_step_duration_seconds", "Duration of one engine step "
                                   "(schedule, forward pass, sampling)", ["model"], buckets=STEP_BUCKETS,
                                   registry=registry)
        self._registry = registry
        if model_registry is not None:
            self.watch(model_registry)

    def watch(self, model_registry) -> None:
        """Export the gauges read from ``model_registry``'s engines at every scrape."""
        self._registry.register(_EngineGauges(model_registry))

    def model_loaded(self, model: str) -> None:
        """Export ``model``'s per-request series at 0 as soon as it serves (see ``RpcMetrics.expect``)."""
        for metric in (self.ttft, self.tpot, self.latency, self.prompt_tokens, self.generation_tokens, self.aborted):
            metric.labels(model)

    def engine_listener(self, model: str) -> EngineListener:
        """The stats listener to give ``model``'s engine (``Engine.set_stats_listener``)."""
        return EngineListener(self, model)

    def finished(self, model: str, start: float, first: float | None, end: float,
                 prompt_tokens: int, completion_tokens: int) -> None:
        self.latency.labels(model).observe(end - start)
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        if first is not None:
            self.ttft.labels(model).observe(first - start)
            if completion_tokens > 1:
                self.tpot.labels(model).observe((end - first) / (completion_tokens - 1))


class EngineListener:
    """An engine's ``lmcore.engine.stats.StatsListener``: steps and finished requests into the
    histograms above, labelled with the engine's model (and each request's adapter)."""

    __slots__ = ("metrics", "model", "_batch", "_step")

    def __init__(self, metrics: InferenceMetrics, model: str):
        self.metrics, self.model = metrics, model
        self._batch = metrics.batch_size.labels(model)  # resolved once: on_step runs every step
        self._step = metrics.step_time.labels(model)
        from lmcore.engine.stats import FINISH_REASONS  # here, not at import: the tokenizer needs no torch

        for reason in FINISH_REASONS:  # exported at 0 from the start: the first finish is an increase
            metrics.finished_requests.labels(model, "", reason)
        for hist in (metrics.queue_time, metrics.prefill_time, metrics.decode_time):
            hist.labels(model, "")

    def on_step(self, stats) -> None:
        self._batch.observe(stats.batch_size)
        self._step.observe(stats.duration_s)

    def on_request_finished(self, stats) -> None:
        m, labels = self.metrics, (self.model, stats.adapter or "")
        m.finished_requests.labels(*labels, stats.finish_reason).inc()
        for hist, seconds in ((m.queue_time, stats.queue_s), (m.prefill_time, stats.prefill_s),
                              (m.decode_time, stats.decode_s)):
            if seconds is not None:
                hist.labels(*labels).observe(seconds)


class _EngineGauges:
    """Occupancy read from every loaded engine when Prometheus scrapes: running and queued requests
    per served name (a banked adapter counts its own), KV-cache use and prefix-cache counters per
    engine (a banked adapter shares its base's, so it is reported once, under the base)."""

    def __init__(self, model_registry):
        self.model_registry = model_registry

    def collect(self):
        p = "lmstack_inference"
        running = GaugeMetricFamily(f"{p}_running_requests", "Requests in the running batch", labels=["model"])
        waiting = GaugeMetricFamily(f"{p}_queue_depth_requests", "Requests waiting for a slot", labels=["model"])
        capacity = GaugeMetricFamily(f"{p}_queue_capacity_requests", "Requests that may wait before new ones "
                                     "are refused (RESOURCE_EXHAUSTED), beyond the free slots", labels=["model"])
        slots = GaugeMetricFamily(f"{p}_kv_cache_slot_usage_ratio", "Fraction of KV-cache slots (batch "
                                  "places) holding a request", labels=["model"])
        tokens = GaugeMetricFamily(f"{p}_kv_cache_token_usage_ratio", "Fraction of KV-cache token positions "
                                   "holding keys and values", labels=["model"])
        queried = CounterMetricFamily(f"{p}_prefix_cache_query_tokens", "Prompt tokens looked up in the "
                                      "prefix cache", labels=["model"])
        hits = CounterMetricFamily(f"{p}_prefix_cache_hit_tokens", "Prompt tokens whose keys and values "
                                   "came from the prefix cache", labels=["model"])
        # Speculative decoding (vLLM's spec_decode_num_draft_tokens / _num_accepted_tokens), per engine.
        drafted = CounterMetricFamily(f"{p}_spec_decode_draft_tokens", "Tokens proposed by speculative "
                                      "decoding (prompt lookup or a draft model)", labels=["model"])
        accepted = CounterMetricFamily(f"{p}_spec_decode_accepted_tokens", "Proposed tokens the model "
                                       "accepted (acceptance rate = accepted / draft)", labels=["model"])
        for entry in self.model_registry.entries():
            r, w = entry.obj.load()
            running.add_metric([entry.name], r)
            waiting.add_metric([entry.name], w)
            stats = entry.obj.engine_stats()
            if stats is None:
                continue
            capacity.add_metric([entry.name], stats["max_waiting"])
            slots.add_metric([entry.name], stats["running"] / stats["max_batch_size"])
            tokens.add_metric([entry.name], stats["kv_cache_tokens_used"] / stats["kv_cache_tokens_total"])
            if stats["prefix_cache_enabled"]:
                queried.add_metric([entry.name], stats["prefix_cache_query_tokens"])
                hits.add_metric([entry.name], stats["prefix_cache_hit_tokens"])
            drafted.add_metric([entry.name], stats["spec_proposed_tokens"])
            accepted.add_metric([entry.name], stats["spec_accepted_tokens"])
        yield from (running, waiting, capacity, slots, tokens, queried, hits, drafted, accepted)


class TokenizerMetrics:
    """Tokens and UTF-8 text bytes through the tokenizer service, by model and method."""

    METHODS = ("encode", "encode_batch", "decode", "count_tokens")

    def __init__(self, registry: CollectorRegistry):
        self.tokens = Counter("lmstack_tokenizer_tokens", "Tokens produced (encode) or consumed (decode)",
                              ["model", "method"], registry=registry)
        self.text_bytes = Counter("lmstack_tokenizer_text_bytes", "UTF-8 bytes of text encoded or decoded",
                                  ["model", "method"], registry=registry)

    def model_loaded(self, model: str) -> None:
        """Export ``model``'s series at 0 as soon as it serves (see ``RpcMetrics.expect``)."""
        for method in self.METHODS:
            self.tokens.labels(model, method)
            self.text_bytes.labels(model, method)

    def observe(self, model: str, method: str, tokens: int, text_bytes: int) -> None:
        self.tokens.labels(model, method).inc(tokens)
        self.text_bytes.labels(model, method).inc(text_bytes)
