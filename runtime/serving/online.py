"""`timecma-serve --bundle DIR`: an online forecast endpoint on Ray Serve (DESIGN §13).

``POST /forecast`` takes one window as JSON, either
``{"timestamps": [...seq_len ISO strings], "values": [[...N numbers] x seq_len]}`` (columns in
the order ``GET /metadata`` lists) or ``{"records": [{"<time_col>": ..., "<var>": ..., ...}]}``
(a bare list of records works too), and answers
``{"timestamps": [...pred_len], "variables": [...], "forecast": [[...N] x pred_len]}`` in
original units. ``GET /health`` and ``GET /metadata`` describe the replica. A bad request gets
HTTP 400 with the ``InputError`` message; the replica keeps serving.

``ForecastEndpoint.handle`` is plain Python (method, path, body -> status, JSON), so the
request contract is tested without a cluster; Ray Serve only wraps it. Torch-free.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import signal
import threading

import click
import numpy as np

from timecma.core.errors import EXIT_CODES_HELP, BackendUnavailable, BundleError, InputError, fail

from ..backends.base import BACKENDS, threads_option

log = logging.getLogger(__name__)

MAX_BODY = 8 << 20  # a window of a few hundred variables is far below this


def _number(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise InputError(f"{where} is {x!r}; a number is needed")
    return float(x)


def parse_window(body: bytes, time_col: str, variables: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A request body -> (values [L, N] float64, timestamps [L]); shape and values are checked by predict."""
    if len(body) > MAX_BODY:
        raise InputError(f"request body is {len(body)} bytes; at most {MAX_BODY} are accepted")
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"request body is not JSON: {exc}") from exc
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
    return np.asarray(values, dtype=np.float64).reshape(len(values), len(variables)), stamps


class ForecastEndpoint:
    """One replica: the bundle loaded once; ``handle`` answers a request, ``__call__`` adapts Ray Serve's."""

    def __init__(self, bundle: str, backend: str = "auto", store: str | None = None, threads: int | None = None):
        from .forecaster import Forecaster

        kwargs = threads_option(backend, threads)
        self.f = Forecaster.load(bundle, backend=backend, store=store, **kwargs)
        cfg = self.f.manifest.model_config
        self.metadata = {"variables": self.f.variables, "time_col": self.f.time_col, "seq_len": self.f.seq_len,
                         "pred_len": self.f.pred_len, "frequency": self.f.frequency, "backend": self.f.backend.name,
                         "model": cfg.model, "llm": self.f.manifest.llm.id if self.f.manifest.llm else None}

    def handle(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
        """(HTTP status, JSON body) for a request; never raises on bad input."""
        path = "/" + path.strip("/")
        routes = {"/health": "GET", "/metadata": "GET", "/forecast": "POST"}
        if path not in routes:
            return 404, {"error": f"no route {path}; try POST /forecast, GET /metadata, GET /health"}
        if method != routes[path]:
            return 405, {"error": f"{path} takes {routes[path]}, not {method}"}
        if path == "/health":
            return 200, {"status": "ok"}
        if path == "/metadata":
            return 200, self.metadata
        try:
            values, ts = parse_window(body, self.f.time_col, self.f.variables)
            y = self.f.predict(values, ts)
        except InputError as exc:
            return 400, {"error": str(exc)}
        steps = self.f.forecast_timestamps(ts[-1])
        return 200, {"timestamps": [str(t) for t in np.datetime_as_string(steps, unit="s")],
                     "variables": self.f.variables, "forecast": y.astype(float).tolist()}

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        body = await request.body() if request.method == "POST" else b""
        status, doc = self.handle(request.method, request.url.path, body)
        return JSONResponse(doc, status_code=status)


def build_app(bundle: str, *, replicas: int = 1, backend: str = "auto", store: str | None = None,
              cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0):
    """The Ray Serve application: ``replicas`` copies of the endpoint, each with its own threads."""
    from ray import serve

    threads = max(1, int(round(cpus_per_replica)))
    dep = serve.deployment(ForecastEndpoint, name="timecma").options(
        num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica})
    return dep.bind(os.path.abspath(bundle), backend, store, threads)


def start(bundle: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, backend: str = "auto",
          store: str | None = None, cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0) -> str:
    """Deploy on the connected cluster; returns the base URL once every replica is up."""
    from ray import serve

    from timecma.core.manifest import read_manifest

    manifest = read_manifest(bundle)  # a wrong bundle fails here, not in a replica restart loop
    if store is None and manifest.llm is not None:
        from .ray_batch import node_store_dir

        store = node_store_dir(manifest.llm.namespace)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(bundle, replicas=replicas, backend=backend, store=store, cpus_per_replica=cpus_per_replica,
                        gpus_per_replica=gpus_per_replica), name="timecma", route_prefix="/")
    return f"http://{host}:{port}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.option("--bundle", required=True, type=click.Path(), help="Bundle directory written by timecma-export.")
@click.option("--replicas", default=1, show_default=True, help="Copies of the model serving requests.")
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 to listen on every interface.")
@click.option("--port", default=8000, show_default=True)
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True)
@click.option("--store", default=None, help="Embedding store on each node's LOCAL disk (default: its temp dir).")
@click.option("--cpus-per-replica", default=1.0, show_default=True, type=float)
@click.option("--gpus-per-replica", default=0.0, show_default=True, type=float)
@click.option("--ray", "ray_address", default="local", show_default=True, metavar="ADDRESS",
              help="'local' starts a cluster here; 'auto', host:port or ray://host:10001 joins one.")
def serve_cmd(bundle, replicas, host, port, backend, store, cpus_per_replica, gpus_per_replica, ray_address):
    """Serve a timecma bundle over HTTP: POST /forecast, GET /metadata, GET /health (Ray Serve)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("timecma").setLevel(logging.INFO)
    from timecma.core.ray_setup import connect, unwrap

    prog = "timecma-serve"
    try:
        connect(ray_address, progress=False)
        url = start(bundle, host=host, port=port, replicas=replicas, backend=backend, store=store,
                    cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica)
    except (InputError, BundleError, BackendUnavailable) as exc:
        fail(prog, exc)
    except Exception as exc:  # a replica's constructor error arrives wrapped by Ray
        if unwrap(exc) is exc:
            raise
        fail(prog, unwrap(exc))
    click.echo(f"timecma-serve: {replicas} replica(s) of {bundle} at {url} (POST /forecast, GET /metadata, "
               f"GET /health); Ctrl-C stops")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    from ray import serve

    serve.shutdown()
