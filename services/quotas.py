"""Request quotas per tenant: generation requests in flight and tokens per minute.

The inference service admits every generation request (Complete, CompleteStream, FewShot, Score,
Inspect) through :meth:`RequestQuotas.admit` before it reaches an engine::

    ticket = quotas.admit(tenant, prompt_tokens)   # ResourceExhausted naming the quota and its limit
    try:
        ...generate...
    finally:
        ticket.release(completion_tokens)          # the tokens count toward the next 60 s

``concurrent_requests`` counts tickets not yet released; ``tokens_per_minute`` sums the prompt
and completion tokens charged over a sliding 60-second window, and a request is admitted only if
its prompt still fits (an admitted request runs to its end: it is never cut off mid-stream). The
counters live in this process, on its one event loop (so admission is atomic); several inference
replicas each enforce the limit on their own share. The fine-tuning quotas (jobs, dataset bytes,
published models) are Redis's, atomic across processes (``services.finetune.store``).

Metrics, per tenant (label values come only from the keys file, so cardinality is bounded):
``lmstack_tenant_requests_total{tenant}``, ``lmstack_tenant_tokens_total{tenant}``,
``lmstack_tenant_quota_rejections_total{tenant,quota}`` and ``lmstack_tenant_requests_in_flight{tenant}``.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge

from .errors import ResourceExhausted
from .tenants import Tenant

WINDOW_S = 60.0


class TenantMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("lmstack_tenant_requests", "Generation requests admitted, by tenant", ["tenant"],
                                registry=registry)
        self.tokens = Counter("lmstack_tenant_tokens", "Prompt + completion tokens charged, by tenant", ["tenant"],
                              registry=registry)
        self.rejections = Counter("lmstack_tenant_quota_rejections", "Requests refused by a quota, by tenant "
                                  "and quota", ["tenant", "quota"], registry=registry)
        self.in_flight = Gauge("lmstack_tenant_requests_in_flight", "Generation requests running, by tenant",
                               ["tenant"], registry=registry)


def exhausted(tenant: Tenant, quota: str, limit: int, detail: str) -> ResourceExhausted:
    """The one message shape of every quota refusal (gRPC RESOURCE_EXHAUSTED, HTTP 429)."""
    return ResourceExhausted(f"quota {quota} of tenant {tenant.name!r} reached (limit {limit}): {detail}")


class Ticket:
    def __init__(self, owner: RequestQuotas, tenant: Tenant):
        self.owner, self.tenant, self.released = owner, tenant, False

    def release(self, tokens: int = 0) -> None:
        if not self.released:
            self.released = True
            self.owner._release(self.tenant, tokens)


class RequestQuotas:
    def __init__(self, metrics: TenantMetrics | None = None, window_s: float = WINDOW_S, clock=time.monotonic):
        self.metrics, self.window_s, self.clock = metrics, window_s, clock
        self._in_flight: dict[str, int] = {}
        self._charged: dict[str, deque[tuple[float, int]]] = {}

    def tokens_used(self, tenant: str) -> tuple[int, float]:
        """(tokens charged in the window, seconds until the oldest charge leaves it)."""
        window = self._charged.get(tenant)
        if not window:
            return 0, 0.0
        cutoff = self.clock() - self.window_s
        while window and window[0][0] <= cutoff:
            window.popleft()
        return sum(n for _, n in window), (window[0][0] - cutoff if window else 0.0)

    def admit(self, tenant: Tenant, prompt_tokens: int = 0) -> Ticket:
        q = tenant.quotas
        running = self._in_flight.get(tenant.name, 0)
        if q.concurrent_requests and running >= q.concurrent_requests:
            self._reject(tenant, "concurrent_requests")
            raise exhausted(tenant, "concurrent_requests", q.concurrent_requests,
                            f"{running} requests in flight; retry when one finishes")
        if q.tokens_per_minute:
            used, wait = self.tokens_used(tenant.name)
            if used + prompt_tokens > q.tokens_per_minute:
                self._reject(tenant, "tokens_per_minute")
                raise exhausted(tenant, "tokens_per_minute", q.tokens_per_minute,
                                f"{used} tokens used in the last {self.window_s:.0f} s and this prompt is "
                                f"{prompt_tokens}; retry in {max(wait, 0.1):.1f} s")
        self._in_flight[tenant.name] = running + 1
        self._charge(tenant.name, prompt_tokens)
        if self.metrics is not None:
            self.metrics.requests.labels(tenant.name).inc()
            self.metrics.in_flight.labels(tenant.name).set(running + 1)
        return Ticket(self, tenant)

    def _charge(self, name: str, tokens: int) -> None:
        if tokens > 0:
            self._charged.setdefault(name, deque()).append((self.clock(), tokens))
            if self.metrics is not None:
                self.metrics.tokens.labels(name).inc(tokens)

    def _release(self, tenant: Tenant, tokens: int) -> None:
        left = self._in_flight.get(tenant.name, 1) - 1
        self._in_flight[tenant.name] = left
        self._charge(tenant.name, tokens)
        if self.metrics is not None:
            self.metrics.in_flight.labels(tenant.name).set(left)

    def _reject(self, tenant: Tenant, quota: str) -> None:
        if self.metrics is not None:
            self.metrics.rejections.labels(tenant.name, quota).inc()
