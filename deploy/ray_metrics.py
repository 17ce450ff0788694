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

A series also leaves Ray's export when it leaves the registry, as it leaves a standalone
``/metrics`` (a job's ``job_id`` gauges when the job stops running, the job-store gauges while Redis
is down, an unloaded model's series). Ray's metrics API has no call to remove a tag set; what it
does (measured on Ray 2.60, its OpenTelemetry export): a gauge tag set that is not set again ages
out of the export after ~20 s, and one set to NaN is dropped at the next report (every
``metrics_report_interval_ms``). So each export sets every live series (refreshing it) and sets
NaN once on each series the registry no longer has (``tests/deploy/test_ray_serve.py`` shows such
series leaving a real cluster's export).
"""

from __future__ import annotations

import asyncio
import logging
import math

log = logging.getLogger("lmstack.ray.metrics")

class RayMetricsExport:
    """Mirror a ``prometheus_client.CollectorRegistry`` into ``ray.util.metrics`` gauges."""

    def __init__(self, registry, interval_s: float = 5.0):
        self.registry = registry
        self.interval_s = interval_s
        self._gauges: dict[str, object] = {}
        self._last: dict[tuple, object] = {}  # (name, labels) -> Ray gauge, of the series last exported
        self._task: asyncio.Task | None = None

    def export_once(self) -> None:
        from ray.util.metrics import Gauge

        now: dict[tuple, object] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # prometheus_client's creation timestamps
                    continue
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    gauge = Gauge(sample.name, family.documentation or sample.name,
                                  tag_keys=tuple(sorted(sample.labels)))
                    self._gauges[sample.name] = gauge
                gauge.set(float(sample.value), tags=dict(sample.labels) or None)
                now[(sample.name, tuple(sorted(sample.labels.items())))] = gauge
        for (name, labels), gauge in self._last.items():
            if (name, labels) not in now:  # gone from the registry: NaN drops it from Ray's export
                gauge.set(math.nan, tags=dict(labels) or None)
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
