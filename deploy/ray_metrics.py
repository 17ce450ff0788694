"""lmstack's Prometheus metrics from Ray replicas, through Ray's own metrics export.

On Ray, a replica serves no ``/metrics`` port of its own: Ray's documented path is
``ray.util.metrics`` (Counter, Gauge, Histogram), which every node's metrics agent exports on its
``metrics_export_port`` with a ``ray_`` prefix, beside Serve's ``ray_serve_*`` metrics; Prometheus
finds the agents through Ray's service-discovery file (``deploy/prometheus/ray.yml``).

The services keep their ``prometheus_client`` registries (the same metric objects a standalone
server exposes), and ``RayMetricsExport`` copies every sample of such a registry into a Ray gauge
of the same name every ``interval_s`` seconds. So ``lmstack_inference_generation_tokens_total``
arrives in Prometheus as ``ray_lmstack_inference_generation_tokens_total`` (a histogram's
``_bucket``/``_sum``/``_count`` likewise, with its ``le`` label), labelled as before plus Ray's
``WorkerId``, ``NodeAddress`` and ``SessionName``: one series per replica. The values are the
registry's own (counters stay cumulative, so ``rate()`` and ``histogram_quantile()`` work as on the
standalone servers); only the prefix differs. The registry is collected on a thread, as a
standalone server's ``/metrics`` is, so a collector that reads Redis never blocks the replica.

Ray cannot drop a series: a tag set a process once recorded is exported with its last value for as
long as the process lives (measured on Ray 2.60; a dead process's series age out). Two rules follow:

* a series that leaves the registry (a worker's current-job gauges once its job ends, the job-store
  gauges while Redis is down) is set to NaN, which Grafana draws as a gap and PromQL comparisons
  drop, instead of repeating its last value;
* a family labelled with an unbounded label (``UNBOUNDED_LABELS``: a job id) is not mirrored at all,
  because each value would stay in the export for the life of the replica.
"""

from __future__ import annotations

import asyncio
import logging
import math

log = logging.getLogger("lmstack.ray.metrics")

UNBOUNDED_LABELS = frozenset({"job_id", "request_id"})


class RayMetricsExport:
    """Mirror a ``prometheus_client.CollectorRegistry`` into ``ray.util.metrics`` gauges."""

    def __init__(self, registry, interval_s: float = 5.0):
        self.registry = registry
        self.interval_s = interval_s
        self._gauges: dict[str, object] = {}
        self._last: dict[tuple, object] = {}  # (name, labels) -> gauge, of the previous export
        self._skipped: set[str] = set()
        self._task: asyncio.Task | None = None

    def export_once(self) -> None:
        from ray.util.metrics import Gauge

        now: dict[tuple, object] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # prometheus_client's creation timestamps
                    continue
                if UNBOUNDED_LABELS & sample.labels.keys():
                    if family.name not in self._skipped:
                        self._skipped.add(family.name)
                        log.info("%s is not exported on Ray: its %s label is unbounded", family.name,
                                 sorted(UNBOUNDED_LABELS & sample.labels.keys()))
                    continue
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    gauge = Gauge(sample.name, family.documentation or sample.name,
                                  tag_keys=tuple(sorted(sample.labels)))
                    self._gauges[sample.name] = gauge
                gauge.set(float(sample.value), tags=dict(sample.labels) or None)
                now[(sample.name, tuple(sorted(sample.labels.items())))] = gauge
        for (name, labels), gauge in self._last.items():
            if (name, labels) not in now:  # gone from the registry: Ray would repeat its last value
                gauge.set(math.nan, tags=dict(labels) or None)
        # A series set to NaN stays NaN until it comes back; it needs no further update.
        self._last = now

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.export_once)
            except Exception as e:  # a metrics hiccup never takes a replica down
                log.warning("metrics export failed: %s", e)
            await asyncio.sleep(self.interval_s)

    def start(self) -> RayMetricsExport:
        """Export on the running event loop until ``stop()``."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
