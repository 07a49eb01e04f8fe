"""Prometheus metrics of one endpoint replica (``GET /metrics``, text format), on a registry of its own
so that several endpoints in one process (tests, two deployments) never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .forecaster import Stats

# 1 ms .. 60 s: a store hit on the demo model is ~1 ms, a SmolLM2 miss on two cores a few seconds
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EndpointMetrics:
    """Requests by route and status, latency end to end and per pipeline stage, store hits and misses,
    LLM calls, requests in flight (the queue), refusals by reason."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("timecma_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("timecma_request_seconds", "Request latency, end to end", ["route"],
                                 buckets=_BUCKETS, registry=r)
        self.stage = Histogram("timecma_stage_seconds", "Seconds per forecast call (one batch of windows) in each pipeline stage",
                               ["stage"], buckets=_BUCKETS, registry=r)
        self.store = Counter("timecma_store_lookups", "Prompt embeddings found in the store (hit) or computed (miss)",
                             ["result"], registry=r)
        self.window_hits = Counter("timecma_window_hits", "Single-window forecasts served from a stored window "
                                   "record (the window was served before: no prompts, no prompt encoder)", registry=r)
        self.llm_calls = Counter("timecma_llm_calls", "LLM engine calls (one per planned batch of misses)", registry=r)
        self.in_flight = Gauge("timecma_in_flight_requests", "Forecast requests admitted and not yet answered "
                               "(running or waiting for their turn)", registry=r)
        self.store_write_failures = Counter("timecma_store_write_failures", "Batches of new vectors the store "
                                            "could not take (disk full, read-only, map full): served uncached",
                                            registry=r)
        self.batch_windows = Histogram("timecma_batch_windows", "Windows per forecast call (dynamic batching of "
                                       "concurrent requests)", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.store_evictions = Gauge("timecma_store_evictions", "Generations the bounded store has evicted "
                                     "(--store-max-gb)", registry=r)
        self.store_bytes = Gauge("timecma_store_disk_bytes", "Bytes of the bounded store's files on disk", registry=r)
        self.refusals = Counter("timecma_refusals", "Requests refused, by reason", ["reason"], registry=r)

    def observe_forecast(self, before: Stats, after: Stats) -> None:
        """What one forecast call (a batch of concurrent windows) added to the forecaster's counters."""
        for name, sec in after.seconds.items():
            self.stage.labels(name).observe(sec - before.seconds.get(name, 0.0))
        self.store.labels("hit").inc(after.hits - before.hits)
        self.store.labels("miss").inc(after.misses - before.misses)
        self.llm_calls.inc(after.llm_calls - before.llm_calls)
        self.window_hits.inc(after.window_hits - before.window_hits)
        self.store_write_failures.inc(after.store_write_failures - before.store_write_failures)

    def text(self, store=None) -> str:
        """The exposition, with the bounded store's gauges read now (``store``: the forecaster's store, if any)."""
        if hasattr(store, "evictions"):
            self.store_evictions.set(store.evictions)
            self.store_bytes.set(store.disk_bytes())
        return generate_latest(self.registry).decode()
