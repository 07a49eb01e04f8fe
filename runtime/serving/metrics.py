"""Prometheus metrics of one endpoint replica (``GET /metrics``, text format), on a registry of its own
so that several endpoints in one process (tests, two deployments) never share counters."""

from __future__ import annotations

import copy

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .forecaster import Stats


def snapshot(stats: Stats) -> Stats:
    """A copy of the forecaster's counters (a shallow copy and its dict of seconds: what deepcopy did, cheaper)."""
    out = copy.copy(stats)
    out.seconds = dict(stats.seconds)
    return out

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
        self.refusals = Counter("timecma_refusals", "Requests refused (answered 4xx or 5xx), by reason", ["reason"],
                                registry=r)
        self.failed_batches = Counter("timecma_failed_batches", "Forecast batches that raised something other than "
                                      "bad input (their requests answered 500; the forecasting thread goes on)",
                                      registry=r)
        self.ready = Gauge("timecma_ready", "1 when warmed up and the forecasting thread runs (readiness)", registry=r)
        self.forecasting_thread = Gauge("timecma_forecasting_thread_alive", "1 while the forecasting thread runs "
                                        "(liveness)", registry=r)
        self._failed_seen = 0
        # labelled children resolved once (``labels()`` costs microseconds on every request otherwise)
        self._stages: dict = {}
        self._hit, self._miss = self.store.labels("hit"), self.store.labels("miss")
        self._answers: dict = {}

    def answered(self, route: str, status: int, seconds: float, refusal: str | None) -> None:
        """One HTTP answer: counted by route and status, its latency, and a refusal (4xx/5xx) by reason."""
        children = self._answers.get((route, status))
        if children is None:
            children = self._answers[(route, status)] = (self.requests.labels(route, str(status)),
                                                         self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)
        if refusal is not None:
            self.refusals.labels(refusal).inc()

    def observe_forecast(self, before: Stats, after: Stats) -> None:
        """What one forecast call (a batch of concurrent windows) added to the forecaster's counters."""
        for name, sec in after.seconds.items():
            child = self._stages.get(name)
            if child is None:
                child = self._stages[name] = self.stage.labels(name)
            child.observe(sec - before.seconds.get(name, 0.0))
        self._hit.inc(after.hits - before.hits)
        self._miss.inc(after.misses - before.misses)
        self.llm_calls.inc(after.llm_calls - before.llm_calls)
        self.window_hits.inc(after.window_hits - before.window_hits)
        self.store_write_failures.inc(after.store_write_failures - before.store_write_failures)

    def text(self, store=None, batcher=None, ready: bool | None = None) -> str:
        """The exposition, with the bounded store's gauges read now (``store``: the forecaster's store, if any),
        the batcher's failed batches and thread, and readiness."""
        if hasattr(store, "evictions"):
            self.store_evictions.set(store.evictions)
            self.store_bytes.set(store.disk_bytes())
        if batcher is not None:
            failed = batcher.failed_batches
            self.failed_batches.inc(failed - self._failed_seen)
            self._failed_seen = failed
            self.forecasting_thread.set(int(batcher.alive))
        if ready is not None:
            self.ready.set(int(ready))
        return generate_latest(self.registry).decode()
