"""One replica of the online endpoint, without HTTP: the bundle loaded once, the window batcher (the only
thread that forecasts), admission (key, readiness, slots, deadline), metrics, and what ``/info`` says.

The HTTP layer (``app``: FastAPI, today's API and the Open Inference Protocol) calls it; it is the
same object whether the app runs in one process on uvicorn or in a Ray Serve replica. Refusals are
``Refusal`` exceptions carrying the HTTP status, the reason ``/metrics`` counts them under, the message
and headers (``Retry-After``). Torch-free, FastAPI-free.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import os
import socket
import threading
from dataclasses import asdict, dataclass, field

import numpy as np
from prometheus_client import Counter

from timecma import __version__
from timecma.core.errors import InputError
from timecma.core.manifest import PARITY_FILE

from ..backends.base import threads_option
from .batcher import BatcherStopped, DeadlineExceeded, WindowBatcher
from .metrics import snapshot

log = logging.getLogger(__name__)

MAX_BODY = 8 << 20  # default --max-body-bytes: a window of a few hundred variables is far below this


@dataclass
class Limits:
    """What one replica admits; in ``/info``. One window per request, so the body bound is the size bound."""

    max_concurrent: int = 4  # forecast requests in flight (running or waiting for their turn); beyond: 429
    max_body_bytes: int = MAX_BODY  # larger bodies: 413 (a declared Content-Length unread; a chunked one cut off)
    deadline_s: float = 30.0  # a request whose forecast is not ready within this: 504
    max_wait_ms: float = 2.0  # dynamic batching: how long a batch waits for requests already on their way
    max_batch_tokens: int = 16384  # padded tokens per LLM call when concurrent requests' misses are embedded
    max_batch_windows: int = 0  # windows per forecast call; 0: up to max_concurrent; 1 turns dynamic batching off

    def __post_init__(self):
        if (self.max_concurrent < 1 or self.max_body_bytes < 1 or self.deadline_s <= 0 or self.max_wait_ms < 0
                or self.max_batch_tokens < 1 or self.max_batch_windows < 0):
            raise InputError(f"endpoint limits must be positive: {self}")


class Refusal(Exception):
    """A request the replica does not serve: HTTP ``status``, ``reason`` (its /metrics label), message."""

    def __init__(self, status: int, reason: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers or {}


RETRY = {"Retry-After": "1"}


@dataclass
class Forecast:
    """One window's answer: forecast [pred_len, N] (float32, original units), its timestamps, intervals."""

    y: np.ndarray
    timestamps: np.ndarray  # datetime64[ns] [pred_len]
    intervals: dict = field(default_factory=dict)  # level -> (lo, hi), each [pred_len, N]
    iso: tuple = ()  # the timestamps as ISO 8601 strings (seconds)

    def iso_timestamps(self) -> list[str]:
        return list(self.iso) if self.iso else np.datetime_as_string(self.timestamps, unit="s").tolist()


class ForecastService:
    """A replica: ``ForecastService(bundle, ...)``; ``await forecast(values, timestamps, levels)``.

    Readiness: ``ready`` once the warm-up call on the bundle's parity inputs has run and while the
    forecasting thread lives; ``live`` while that thread lives (a replica whose thread has died cannot
    recover: its liveness probe fails and the orchestrator replaces it). ``warm_up="now"`` warms in the
    constructor (Ray Serve routes to a replica once constructed), ``"background"`` beside a server that
    already answers probes ("starting"), ``"off"`` leaves it to the caller."""

    def __init__(self, bundle: str, backend: str = "auto", store: str | None = None, threads: int | None = None,
                 limits: Limits | None = None, api_key: str | None = None, warm_up: str = "background",
                 store_max_gb: float | None = None):
        from .forecaster import Forecaster
        from .metrics import EndpointMetrics

        if warm_up not in ("now", "background", "off"):
            raise ValueError(f"warm_up is 'now', 'background' or 'off', not {warm_up!r}")
        self.limits = limits or Limits()
        self.f = Forecaster.load(bundle, backend=backend, store=store, store_max_gb=store_max_gb,
                                 llm_batch_tokens=self.limits.max_batch_tokens, **threads_option(backend, threads))
        self._key = api_key.encode() if api_key else None
        self.metrics = EndpointMetrics()
        self._bookkeeping_failures = Counter(
            "timecma_bookkeeping_failures", "Metrics updates after a forecast call that raised (logged; the "
            "forecasts were answered)", registry=self.metrics.registry)
        self._bookkeeping_seen = 0
        self._slots = threading.BoundedSemaphore(self.limits.max_concurrent)
        self._in_flight = 0  # admitted forecast requests (changed on the event loop's thread only)
        # the forecast's timestamps as strings, by the window's last one: a window served again formats nothing
        self._iso = functools.lru_cache(maxsize=4096)(self._iso_steps)
        self._stats = snapshot(self.f.stats)  # what the metrics have seen of the forecaster's counters
        self._stats_lock = threading.Lock()  # _observe_batch runs on the batcher's thread and the event loop's
        # the windows of concurrent requests in one forecast call (at most the requests in flight)
        self.batcher = WindowBatcher(self.f, self.limits.max_batch_windows or self.limits.max_concurrent,
                                     self.limits.max_wait_ms / 1e3, on_batch=self._observe_batch)
        self._warm = threading.Event()
        cfg, m = self.f.manifest.model_config, self.f.manifest
        self.model_name = cfg.model
        self.metadata = {"variables": self.f.variables, "time_col": self.f.time_col, "seq_len": self.f.seq_len,
                         "pred_len": self.f.pred_len, "frequency": self.f.frequency, "backend": self.f.backend.name,
                         "model": cfg.model, "llm": m.llm.id if m.llm else None}
        self.has_calibration = self.f.calibration is not None
        if warm_up == "now":
            self.warm_up()
        elif warm_up == "background":
            threading.Thread(target=self.warm_up, name="timecma-warm-up", daemon=True).start()

    # -- readiness ----------------------------------------------------------------------------
    def warm_up(self) -> None:
        """One call of each graph on the bundle's parity inputs (engines allocate and JIT on first use), then
        ready. Runs before any forecast (nothing is admitted until it has run)."""
        path = os.path.join(self.f.bundle_dir, PARITY_FILE)
        try:
            if os.path.exists(path):
                with np.load(path) as p, self.f._lock:
                    be = self.f.backend
                    if "llm_input_ids" in p:
                        be.run_llm(p["llm_input_ids"], p["llm_attention_mask"])
                    emb = p["fc_prompt_emb"] if "fc_prompt_emb" in p else None  # None: a model without an LLM
                    be.run_forecaster(p["fc_x"], emb)
                    if getattr(be, "split", None):  # the graphs single-window requests run
                        be.run_head(p["fc_x"], be.run_prompt_encoder(p["fc_prompt_emb"]))
        except Exception:  # a warm-up failure must not keep the replica from serving: the first request will tell
            log.exception("warm-up failed")
        self._warm.set()
        log.info("warmed up: ready")

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Until warmed up (True), or ``timeout_s`` passed (False)."""
        return self._warm.wait(timeout_s)

    @property
    def live(self) -> bool:
        return self.batcher.alive

    @property
    def ready(self) -> bool:
        return self._warm.is_set() and self.batcher.alive

    def status(self) -> str:
        return "stopped" if not self.batcher.alive else "ok" if self._warm.is_set() else "starting"

    def ensure_ready(self) -> None:
        if not self.batcher.alive:
            raise Refusal(503, "stopped", "the forecasting thread of this replica has stopped; it cannot forecast "
                                          "(its liveness probe fails: replace it)")
        if not self._warm.is_set():
            raise Refusal(503, "starting", "the replica is warming up", RETRY)

    # -- admission ----------------------------------------------------------------------------
    @property
    def key_required(self) -> bool:
        return self._key is not None

    def key_ok(self, given: str | None) -> bool:
        """A bearer key compared in constant time (the key is never logged)."""
        if self._key is None:
            return True
        return given is not None and hmac.compare_digest(given.strip().encode(), self._key)

    def admit(self) -> "_Slot":
        """``with service.admit(): ...`` holds one of ``max_concurrent`` slots, or raises 429 at once."""
        if not self._slots.acquire(blocking=False):
            raise Refusal(429, "overloaded", f"{self.limits.max_concurrent} requests are in flight on this replica; "
                                             "retry later", RETRY)
        return _Slot(self)

    # -- the forecast -------------------------------------------------------------------------
    async def forecast(self, values: np.ndarray, timestamps: np.ndarray, levels: list[int]) -> Forecast:
        """One window through the batcher within the deadline. Bad input: ``InputError``; past the deadline
        504, a stopped forecasting thread 503 (``Refusal``); anything else propagates (a 500)."""
        self.check_window(values, timestamps, levels)
        y = None
        if self._in_flight == 1:
            await asyncio.sleep(0)  # requests that arrived together are admitted first: then this one is not alone
            if self._in_flight == 1:
                y = self.batcher.run_if_idle(values, timestamps)
        try:
            if y is None:
                y = await self.batcher.submit_async(values, timestamps, self.limits.deadline_s)
        except DeadlineExceeded as exc:
            raise Refusal(504, "deadline", str(exc)) from None
        except BatcherStopped as exc:
            raise Refusal(503, "stopped", str(exc)) from None
        end = timestamps[-1]
        out = Forecast(y, self.f.forecast_timestamps(end), iso=self._iso(int(end.astype("datetime64[ns]").view(np.int64))))
        if levels:  # split-conformal bounds, in original units, shaped like the forecast
            out.intervals = {lv: (lo[0], hi[0]) for lv, (lo, hi) in
                             self.f.intervals(values[None], y[None], levels).items()}
        return out

    def _iso_steps(self, end_ns: int) -> tuple[str, ...]:
        steps = self.f.forecast_timestamps(np.datetime64(end_ns, "ns"))
        return tuple(np.datetime_as_string(steps, unit="s").tolist())

    def check_window(self, values: np.ndarray, timestamps: np.ndarray, levels: list[int]) -> None:
        if values.shape != (self.f.seq_len, self.f.n_vars):
            raise InputError(f"a window needs {self.f.seq_len} rows of {self.f.n_vars} values, got "
                             f"{values.shape[0]} x {values.shape[1] if values.ndim > 1 else 0}")
        if timestamps.shape != (self.f.seq_len,):
            raise InputError(f"a window needs {self.f.seq_len} timestamps, got {timestamps.shape[0]}")
        self.f.check_levels(levels)

    def _observe_batch(self, windows: int) -> None:
        """After each forecast call: its size and stage times. Called on the batcher's thread after a batch and
        on the event loop's thread after a window served on the idle fast path (``run_if_idle``), possibly at
        the same time: the snapshot, the difference and the assignment are one step under ``_stats_lock``
        (the forecaster's counters only grow, so snapshots taken in order never give a negative difference)."""
        with self._stats_lock:
            after = snapshot(self.f.stats)
            self.metrics.batch_windows.observe(windows)
            self.metrics.observe_forecast(self._stats, after)
            self._stats = after

    # -- description --------------------------------------------------------------------------
    def metrics_text(self) -> str:
        failed = self.batcher.failed_bookkeeping  # bookkeeping failures: logged by the batcher, counted here
        with self._stats_lock:
            self._bookkeeping_failures.inc(failed - self._bookkeeping_seen)
            self._bookkeeping_seen = failed
        return self.metrics.text(self.f.store, self.batcher, self.ready)

    def info(self) -> dict:
        """Model, LLM, backend and precision per graph, engines, versions, limits (never the key)."""
        be, m = self.f.backend, self.f.manifest
        own = getattr(be, "precision", None)
        precision = (own if isinstance(own, dict)
                     else {g: e.precision for g, e in getattr(be, "engines", {}).items()}
                     or {"llm": getattr(be, "llm_variant", None) or "fp32", "forecaster": "fp32"})
        llm = m.llm
        return {**self.metadata, "backend": {"name": be.name, "precision": precision,
                                             "llm_store_precision": be.llm_precision},
                "llm": None if llm is None else {"id": llm.id, "d_llm": llm.d_llm, "layers": llm.info.get("extra", {})
                                                 .get("layers"), "gguf": llm.info.get("extra", {}).get("gguf")},
                "intervals": m.info.get("calibration"), "engines": [e.file for e in m.engines],
                "versions": {**m.versions, "timecma_runtime": __version__},
                "limits": asdict(self.limits), "api_key_required": self._key is not None,
                "ready": self.ready, "live": self.live, "store": getattr(self.f.store, "path", None),
                "replica": {"pid": os.getpid(), "host": socket.gethostname()}}

    def close(self, timeout_s: float = 30.0) -> None:
        """Shutdown: stop the batcher (the batch it runs finishes; queued requests are answered 503), then close
        the engines and the store under the forecaster's lock, so that nothing forecasting still uses them."""
        if not self.batcher.stop(timeout_s):
            log.warning("a forecast batch still runs after %g s; closing once it has finished", timeout_s)
        self.f.close()  # under the forecaster's lock: waits for a forecast that still runs


class _Slot:
    __slots__ = ("s",)

    def __init__(self, service: ForecastService):
        self.s = service
        service._in_flight += 1
        service.metrics.in_flight.inc()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        self.s._in_flight -= 1
        self.s.metrics.in_flight.dec()
        self.s._slots.release()
