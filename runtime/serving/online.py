"""`timecma-serve --bundle DIR`: an online forecast endpoint on Ray Serve (DESIGN §13, §15).

``POST /forecast`` takes one window as JSON, either
``{"timestamps": [...seq_len ISO strings], "values": [[...N numbers] x seq_len]}`` (columns in
the order ``GET /metadata`` lists) or ``{"records": [{"<time_col>": ..., "<var>": ..., ...}]}``
(a bare list of records works too), and answers
``{"timestamps": [...pred_len], "variables": [...], "forecast": [[...N] x pred_len]}`` in
original units; with ``"levels": [80, 95]`` in the request also ``"intervals": {"80": {"lo": ..., "hi":
...}}`` (split-conformal, shaped like the forecast). ``GET /health`` (open to probes; "starting" until warmed up), ``/metadata``,
``/info`` and ``/metrics`` (Prometheus text) describe the replica. Refusals are fast and counted:
400 bad input, 401 without the bearer key, 413 too large, 429 too many in flight (Retry-After),
503 while starting, 504 past the deadline.

``ForecastEndpoint.handle`` is plain Python (method, path, body, headers -> status, document,
headers), so the request contract is tested without a cluster; Ray Serve only wraps it. Torch-free.
"""

from __future__ import annotations

import copy
import hmac
import json
import logging
import numbers
import os
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass

import click
import numpy as np

from timecma import __version__
from timecma.core.conformal import parse_levels
from timecma.core.errors import EXIT_CODES_HELP, BackendUnavailable, BundleError, InputError, fail
from timecma.core.manifest import PARITY_FILE

from ..backends.base import BACKENDS, threads_option
from .batcher import DeadlineExceeded, WindowBatcher

log = logging.getLogger(__name__)

MAX_BODY = 8 << 20  # default --max-body-bytes: a window of a few hundred variables is far below this


def _number(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise InputError(f"{where} is {x!r}; a number is needed")
    return float(x)


def parse_window(body: bytes, time_col: str, variables: list[str]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A request body -> (values [L, N] float64, timestamps [L], interval levels); shape and values are
    checked by predict."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"request body is not JSON: {exc}") from exc
    levels = parse_levels(doc.pop("levels", None)) if isinstance(doc, dict) else []
    if isinstance(doc, dict) and "records" in doc:
        doc = doc["records"]
    if isinstance(doc, list):  # one record per row
        values, ts = [], []
        for i, rec in enumerate(doc):
            if not isinstance(rec, dict):
                raise InputError(f"record {i} is not an object")
            if time_col not in rec:
                raise InputError(f"record {i} has no {time_col!r}")
            missing = [v for v in variables if v not in rec]
            if missing:
                raise InputError(f"record {i} lacks variable(s) {missing}; the model needs {variables}")
            extra = [k for k in rec if k != time_col and k not in variables]
            if extra:
                raise InputError(f"record {i} has unexpected key(s) {extra}; the model's variables are {variables}")
            ts.append(rec[time_col])
            values.append([_number(rec[v], f"record {i} {v!r}") for v in variables])
    elif isinstance(doc, dict):
        for k in ("timestamps", "values"):
            if k not in doc:
                raise InputError(f"request needs 'timestamps' and 'values' (or 'records'); {k!r} is missing")
        ts, rows = doc["timestamps"], doc["values"]
        if not isinstance(ts, list) or not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise InputError("'timestamps' must be a list and 'values' a list of rows (lists of numbers)")
        values = [[_number(x, f"values[{i}][{j}]") for j, x in enumerate(r)] for i, r in enumerate(rows)]
        if any(len(r) != len(variables) for r in values):
            raise InputError(f"each row of 'values' needs {len(variables)} numbers, in the order {variables}")
    else:
        raise InputError("request body must be a JSON object or a list of records")
    if not all(isinstance(t, str) for t in ts):
        raise InputError("timestamps must be ISO 8601 strings")
    try:
        stamps = np.array([np.datetime64(t.rstrip("Z"), "ns") for t in ts], dtype="datetime64[ns]")
    except ValueError as exc:
        raise InputError(f"a timestamp is not ISO 8601: {exc}") from exc
    return np.asarray(values, dtype=np.float64).reshape(len(values), len(variables)), stamps, levels


@dataclass
class Limits:
    """What one replica admits; in ``/info``. One window per request, so the body bound is the size bound."""

    max_concurrent: int = 4  # forecast requests in flight (running or waiting for their turn); beyond: 429
    max_body_bytes: int = MAX_BODY  # larger bodies: 413, unread
    deadline_s: float = 30.0  # a request whose forecast is not ready within this: 504
    max_wait_ms: float = 2.0  # dynamic batching: how long the first window of a batch waits for company
    max_batch_tokens: int = 16384  # padded tokens per LLM call when concurrent requests' misses are embedded
    max_batch_windows: int = 0  # windows per forecast call; 0: up to max_concurrent; 1 turns dynamic batching off

    def __post_init__(self):
        if (self.max_concurrent < 1 or self.max_body_bytes < 1 or self.deadline_s <= 0 or self.max_wait_ms < 0
                or self.max_batch_tokens < 1 or self.max_batch_windows < 0):
            raise InputError(f"endpoint limits must be positive: {self}")


Reply = tuple[int, "dict | str", dict]  # HTTP status, JSON document (or text for /metrics), extra headers
ROUTES = {"/health": "GET", "/metadata": "GET", "/info": "GET", "/metrics": "GET", "/forecast": "POST"}


class ForecastEndpoint:
    """One replica: the bundle loaded once; ``handle`` answers a request, ``__call__`` adapts Ray Serve's.

    Admission, in this order: the route; the bearer key (every route but ``/health``, compared in
    constant time, never logged); readiness (``starting`` until the warm-up call on the bundle's parity
    inputs has run: 503); the body size (413); a free slot among ``max_concurrent`` (else 429 at once,
    with Retry-After); the turn within ``deadline_s`` (else 504). Every refusal is counted in ``/metrics``.
    Under Ray Serve the warm-up runs in the constructor (``warm_up="now"``): Ray routes only to constructed
    replicas, so a replacement for a dead one takes traffic once it is warm, never answering "starting".
    """

    def __init__(self, bundle: str, backend: str = "auto", store: str | None = None, threads: int | None = None,
                 limits: Limits | None = None, api_key: str | None = None, warm_up: str = "background",
                 store_max_gb: float | None = None):
        from .forecaster import Forecaster
        from .metrics import EndpointMetrics

        kwargs = threads_option(backend, threads)
        self.limits = limits or Limits()
        self.f = Forecaster.load(bundle, backend=backend, store=store, store_max_gb=store_max_gb,
                                 llm_batch_tokens=self.limits.max_batch_tokens, **kwargs)
        self._key = api_key.encode() if api_key else None
        self.metrics = EndpointMetrics()
        self._slots = threading.BoundedSemaphore(self.limits.max_concurrent)
        # the windows of concurrent requests in one forecast call (at most the requests in flight)
        self.batcher = WindowBatcher(self.f, self.limits.max_batch_windows or self.limits.max_concurrent,
                                     self.limits.max_wait_ms / 1e3,
                                     on_batch=self._observe_batch)
        self.ready = threading.Event()
        self._stats = copy.deepcopy(self.f.stats)  # what the metrics have seen of the forecaster's counters
        cfg = self.f.manifest.model_config
        self.metadata = {"variables": self.f.variables, "time_col": self.f.time_col, "seq_len": self.f.seq_len,
                         "pred_len": self.f.pred_len, "frequency": self.f.frequency, "backend": self.f.backend.name,
                         "model": cfg.model, "llm": self.f.manifest.llm.id if self.f.manifest.llm else None}
        if warm_up == "now":  # Ray Serve routes to a replica once it is constructed: warm before that
            self.warm_up()
        elif warm_up == "background":  # the replica answers /health ("starting") while its engines warm up
            threading.Thread(target=self.warm_up, name="timecma-warm-up", daemon=True).start()
        elif warm_up != "off":
            raise ValueError(f"warm_up is 'now', 'background' or 'off', not {warm_up!r}")

    def warm_up(self) -> None:
        """One call of each graph on the bundle's parity inputs (engines allocate and JIT on first use), then ready."""
        path = os.path.join(self.f.bundle_dir, PARITY_FILE)
        try:
            if os.path.exists(path):
                with np.load(path) as p:  # before ready: no forecast runs beside it
                    if "llm_input_ids" in p:
                        self.f.backend.run_llm(p["llm_input_ids"], p["llm_attention_mask"])
                    self.f.backend.run_forecaster(p["fc_x"], p["fc_prompt_emb"] if "fc_prompt_emb" in p else None)
                    if getattr(self.f.backend, "split", None):  # the graphs single-window requests run
                        self.f.backend.run_head(p["fc_x"], self.f.backend.run_prompt_encoder(p["fc_prompt_emb"]))
        except Exception:  # a warm-up failure must not keep the replica from serving: the first request will tell
            log.exception("warm-up failed")
        self.ready.set()

    def info(self) -> dict:
        """Model, LLM, backend and precision per graph, engines, versions, limits (never the key)."""
        be, m = self.f.backend, self.f.manifest
        precision = (be.precision if isinstance(getattr(be, "precision", None), dict)
                     else {g: e.precision for g, e in getattr(be, "engines", {}).items()}
                     or {"llm": getattr(be, "llm_variant", None) or "fp32", "forecaster": "fp32"})
        llm = m.llm
        return {**self.metadata, "backend": {"name": be.name, "precision": precision,
                                             "llm_store_precision": be.llm_precision},
                "llm": None if llm is None else {"id": llm.id, "d_llm": llm.d_llm, "layers": llm.info.get("extra", {})
                                                 .get("layers"), "gguf": llm.info.get("extra", {}).get("gguf")},
                "intervals": m.info.get("calibration"), "engines": [e.file for e in m.engines], "versions": {**m.versions, "timecma_runtime": __version__},
                "limits": asdict(self.limits), "api_key_required": self._key is not None,
                "ready": self.ready.is_set(), "replica": {"pid": os.getpid(), "host": socket.gethostname()}}

    def handle(self, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> Reply:
        """(HTTP status, document, extra headers) for a request; never raises on bad input."""
        path = "/" + path.strip("/")
        t = time.perf_counter()
        status, doc, extra = self._route(method, path, body, {k.lower(): v for k, v in (headers or {}).items()})
        route = path if path in ROUTES else "other"
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(time.perf_counter() - t)
        return status, doc, extra

    def _refuse(self, status: int, reason: str, message: str, headers: dict | None = None) -> Reply:
        self.metrics.refusals.labels(reason).inc()
        return status, {"error": message}, headers or {}

    def _route(self, method: str, path: str, body: bytes, headers: dict) -> Reply:
        if path not in ROUTES:
            return 404, {"error": f"no route {path}; try POST /forecast, GET /metadata, /info, /metrics, /health"}, {}
        if method != ROUTES[path]:
            return 405, {"error": f"{path} takes {ROUTES[path]}, not {method}"}, {}
        if path == "/health":
            return (200, {"status": "ok"}, {}) if self.ready.is_set() else (503, {"status": "starting"},
                                                                             {"Retry-After": "1"})
        if self._key is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._key):
                return self._refuse(401, "unauthorized", "a valid 'Authorization: Bearer <key>' header is needed",
                                    {"WWW-Authenticate": "Bearer"})
        if path == "/metadata":
            return 200, self.metadata, {}
        if path == "/info":
            return 200, self.info(), {}
        if path == "/metrics":
            return 200, self.metrics.text(self.f.store), {}
        if not self.ready.is_set():
            return self._refuse(503, "starting", "the replica is warming up", {"Retry-After": "1"})
        if len(body) > self.limits.max_body_bytes:
            return self._refuse(413, "too_large", f"request body is {len(body)} bytes; at most "
                                                  f"{self.limits.max_body_bytes} are accepted")
        if not self._slots.acquire(blocking=False):
            return self._refuse(429, "overloaded", f"{self.limits.max_concurrent} requests are in flight on this "
                                                   "replica; retry later", {"Retry-After": "1"})
        self.metrics.in_flight.inc()
        try:
            return self._forecast(body)
        finally:
            self.metrics.in_flight.dec()
            self._slots.release()

    def _observe_batch(self, windows: int) -> None:
        """After each batch (on the batcher's thread, the only one that forecasts): its size and stage times."""
        after = copy.deepcopy(self.f.stats)
        self.metrics.batch_windows.observe(windows)
        self.metrics.observe_forecast(self._stats, after)
        self._stats = after

    def _forecast(self, body: bytes) -> Reply:
        try:
            values, ts, levels = parse_window(body, self.f.time_col, self.f.variables)
            if values.shape[0] != self.f.seq_len:
                raise InputError(f"a window needs {self.f.seq_len} rows, got {values.shape[0]}")
            self.f.check_levels(levels)
            y = self.batcher.submit(values, ts, self.limits.deadline_s)
        except InputError as exc:
            return self._refuse(400, "bad_request", str(exc))
        except DeadlineExceeded as exc:
            return self._refuse(504, "deadline", str(exc))
        steps = self.f.forecast_timestamps(ts[-1])
        doc = {"timestamps": [str(t) for t in np.datetime_as_string(steps, unit="s")],
               "variables": self.f.variables, "forecast": y.astype(float).tolist()}
        if levels:  # split-conformal bounds, in original units, shaped like the forecast
            doc["intervals"] = {str(lv): {"lo": lo[0].astype(float).tolist(), "hi": hi[0].astype(float).tolist()}
                                for lv, (lo, hi) in self.f.intervals(values[None], y[None], levels).items()}
        return 200, doc, {}

    async def __call__(self, request):
        import asyncio

        from starlette.responses import JSONResponse, PlainTextResponse

        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_body_bytes:  # refused unread
            status, doc, extra = self._refuse(413, "too_large", f"request body is {declared} bytes; at most "
                                                                f"{self.limits.max_body_bytes} are accepted")
        else:
            body = await request.body() if request.method == "POST" else b""
            # in a worker thread: the event loop keeps accepting (and refusing) while a forecast runs
            status, doc, extra = await asyncio.to_thread(self.handle, request.method, request.url.path, body,
                                                         dict(request.headers))
        if isinstance(doc, str):
            return PlainTextResponse(doc, status_code=status, headers=extra,
                                     media_type="text/plain; version=0.0.4; charset=utf-8")
        return JSONResponse(doc, status_code=status, headers=extra)


def deployment(*, replicas: int | tuple[int, int] = 1, cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
               limits: Limits | None = None):
    """The Ray Serve deployment of the endpoint: ``replicas`` copies, or ``(min, max)`` autoscaled on queue depth.

    Ray Serve hands a replica at most ``2 x max_concurrent`` requests at once (the excess reaches the
    replica, which answers 429 at once) and queues at most ``max_concurrent`` more in its router, which
    answers 503 beyond that: no queue is unbounded and no client waits forever. Autoscaling adds a
    replica when the requests in flight per replica exceed half of ``max_concurrent`` (Ray Serve's
    ``target_ongoing_requests``), before refusals start."""
    from ray import serve

    limits = limits or Limits()
    if isinstance(replicas, tuple):
        lo, hi = replicas
        if not 1 <= lo <= hi:
            raise InputError(f"--min-replicas {lo} and --max-replicas {hi}: need 1 <= min <= max")
        count = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi,
                                        "target_ongoing_requests": max(1, limits.max_concurrent // 2)}}
    else:
        count = {"num_replicas": replicas}
    return serve.deployment(ForecastEndpoint, name="timecma").options(
        **count, ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=2 * limits.max_concurrent, max_queued_requests=limits.max_concurrent)


def build_app(bundle: str, *, replicas: int | tuple[int, int] = 1, backend: str = "auto", store: str | None = None,
              cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0, limits: Limits | None = None,
              api_key: str | None = None, store_max_gb: float | None = None):
    """The Ray Serve application: the endpoint deployment bound to the bundle, each replica with its own threads."""
    limits = limits or Limits()
    threads = max(1, int(round(cpus_per_replica)))
    dep = deployment(replicas=replicas, cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica,
                     limits=limits)
    # warmed in the constructor: a replacement for a dead replica gets traffic only once it is warm
    return dep.bind(os.path.abspath(bundle), backend, store, threads, limits, api_key, "now", store_max_gb)


def start(bundle: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int | tuple[int, int] = 1,
          backend: str = "auto",
          store: str | None = None, cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
          limits: Limits | None = None, api_key: str | None = None, store_max_gb: float | None = None) -> str:
    """Deploy on the connected cluster; returns the base URL once every replica is up."""
    from ray import serve

    from timecma.core.manifest import read_manifest

    manifest = read_manifest(bundle)  # a wrong bundle fails here, not in a replica restart loop
    if store is None and manifest.llm is not None:
        from .ray_batch import node_store_dir

        store = node_store_dir(manifest.llm.namespace)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(bundle, replicas=replicas, backend=backend, store=store, cpus_per_replica=cpus_per_replica,
                        gpus_per_replica=gpus_per_replica, limits=limits, api_key=api_key,
                        store_max_gb=store_max_gb),
              name="timecma", route_prefix="/")
    url = f"http://{host}:{port}"
    _wait_ready("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)
    return url


def _wait_ready(host: str, port: int, timeout_s: float = 120.0) -> None:
    """Until ``/health`` says ok (the replicas have warmed up), at most ``timeout_s``."""
    import http.client

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BundleError(f"the endpoint at {host}:{port} did not become ready within {timeout_s:.0f} s")
        time.sleep(0.2)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.option("--bundle", required=True, type=click.Path(), help="Bundle directory written by timecma-export.")
@click.option("--replicas", default=1, show_default=True, help="Copies of the model serving requests.")
@click.option("--min-replicas", default=None, type=click.IntRange(min=1),
              help="With --max-replicas: autoscale between the two on requests in flight per replica.")
@click.option("--max-replicas", default=None, type=click.IntRange(min=1))
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 to listen on every interface.")
@click.option("--port", default=8000, show_default=True)
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True)
@click.option("--store", default=None, help="Embedding store on each node's LOCAL disk (default: its temp dir).")
@click.option("--store-max-gb", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Keep each replica's store within this on disk: two generations, the older evicted when the newer "
                   "is full; hits in the older are promoted (an approximate LRU). Default: unbounded.")
@click.option("--cpus-per-replica", default=1.0, show_default=True, type=float)
@click.option("--gpus-per-replica", default=0.0, show_default=True, type=float)
@click.option("--ray", "ray_address", default="local", show_default=True, metavar="ADDRESS",
              help="'local' starts a cluster here; 'auto', host:port or ray://host:10001 joins one.")
@click.option("--max-concurrent", default=Limits.max_concurrent, show_default=True, type=click.IntRange(min=1),
              help="Forecast requests in flight per replica; more get 429 with Retry-After at once.")
@click.option("--max-body-bytes", default=Limits.max_body_bytes, show_default=True, type=click.IntRange(min=1),
              help="Larger request bodies get 413.")
@click.option("--deadline-s", default=Limits.deadline_s, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="A request whose forecast is not ready within this many seconds gets 504.")
@click.option("--max-wait-ms", default=Limits.max_wait_ms, show_default=True, type=click.FloatRange(min=0),
              help="Dynamic batching: how long a window waits for concurrent ones to share its forecast call.")
@click.option("--max-batch-tokens", default=Limits.max_batch_tokens, show_default=True, type=click.IntRange(min=1),
              help="Padded tokens per LLM call when concurrent requests' store misses are embedded together.")
@click.option("--max-batch-windows", default=Limits.max_batch_windows, show_default=True, type=click.IntRange(min=0),
              help="Windows per forecast call (0: up to --max-concurrent; 1 turns dynamic batching off).")
@click.option("--api-key", envvar="TIMECMA_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every route but /health (prefer the environment variable: "
                   "a command line is visible to other users).")
def serve_cmd(bundle, replicas, min_replicas, max_replicas, host, port, backend, store, store_max_gb, cpus_per_replica,
              gpus_per_replica, ray_address,
              max_concurrent, max_body_bytes, deadline_s, max_wait_ms, max_batch_tokens, max_batch_windows, api_key):
    """Serve a timecma bundle over HTTP: POST /forecast, GET /metadata, /info, /metrics, /health (Ray Serve)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("timecma").setLevel(logging.INFO)
    from timecma.core.ray_setup import connect, unwrap

    prog = "timecma-serve"
    if (min_replicas is None) != (max_replicas is None):
        fail(prog, "--min-replicas and --max-replicas go together")
    if min_replicas is not None:
        replicas = (min_replicas, max_replicas)
    try:
        connect(ray_address, progress=False)
        url = start(bundle, host=host, port=port, replicas=replicas, backend=backend, store=store,
                    cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica,
                    limits=Limits(max_concurrent, max_body_bytes, deadline_s, max_wait_ms, max_batch_tokens,
                                  max_batch_windows),
                    api_key=api_key,
                    store_max_gb=store_max_gb)
    except (InputError, BundleError, BackendUnavailable) as exc:
        fail(prog, exc)
    except Exception as exc:  # a replica's constructor error arrives wrapped by Ray
        if unwrap(exc) is exc:
            raise
        fail(prog, unwrap(exc))
    count = f"{replicas[0]}-{replicas[1]} (autoscaled)" if isinstance(replicas, tuple) else replicas
    click.echo(f"timecma-serve: {count} replica(s) of {bundle} at {url} (POST /forecast, GET /metadata, /info, "
               f"/metrics, /health){'; bearer key required' if api_key else ''}; Ctrl-C stops")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    from ray import serve

    serve.shutdown()
