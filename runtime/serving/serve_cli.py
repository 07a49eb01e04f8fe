"""``timecma-serve --bundle DIR``: the command line over the endpoint, in one process or on Ray Serve."""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading

import click

from timecma.core.errors import EXIT_CODES_HELP, BackendUnavailable, BundleError, InputError, fail

from ..backends.base import BACKENDS
from .service import Limits

log = logging.getLogger(__name__)
PROG = "timecma-serve"
ROUTES = "POST /forecast, POST /v2/models/<model>/infer, GET /metadata, /info, /metrics, /health, /docs"

HELP = """Serve a timecma bundle over HTTP: POST /forecast and the Open Inference Protocol v2
(/v2/models/<model>/infer, /v2/health/live|ready: KServe and Triton clients), GET /metadata, /info,
/metrics (Prometheus), /health; OpenAPI at /openapi.json, docs at /docs.

\b
Two ways to run the same app; pick by how many machines the load needs:
  (default)     one process on uvicorn, no Ray on the request path: the
                lowest latency (about 0.35 ms of HTTP on top of the forecast
                on 2 cores); nothing else to start (pip install 'timecma[serve]').
                One forecasting thread per process: scale a box's cores with
                the backend's threads (--threads), more boxes behind a load
                balancer, or --ray.
  --ray [ADDR]  Ray Serve replicas (--replicas N, or --min/--max-replicas to
                autoscale), on this machine (a local cluster) or a cluster
                (ADDR: auto, host:port, ray://host:10001). Costs a proxy hop
                and Ray's own processes on the same cores: with HAProxy
                (--ray-proxy auto, the default, where a binary is found) about
                0.8 ms per request; Ray Serve's own proxy about 5.7 ms
                (measured on 2 cores); a cluster's start takes tens of seconds.

Binds 127.0.0.1 unless --host says otherwise; on any other address use --api-key (a warning says so)."""


def _loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_warnings(host: str, api_key: str | None) -> list[str]:
    """What to warn of before listening on ``host``."""
    if not _loopback(host) and not api_key:
        return [f"listening on {host}, beyond this machine, with no --api-key: anyone who can reach the port can "
                "use the model (set TIMECMA_API_KEY, or bind 127.0.0.1 behind a proxy that authenticates)"]
    return []


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
               help=HELP, epilog=EXIT_CODES_HELP)
@click.option("--bundle", required=True, type=click.Path(), help="Bundle directory written by timecma-export.")
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 to listen on every interface.")
@click.option("--port", default=8000, show_default=True)
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True)
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="Threads of the backend's engines (default: the backend's own; under --ray, --cpus-per-replica).")
@click.option("--store", default=None, help="Embedding store on the LOCAL disk (default: a folder in the temp dir).")
@click.option("--store-max-gb", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Keep the store within this on disk: two generations, the older evicted when the newer is full; "
                   "hits in the older are promoted (an approximate LRU). Each process (replica) owns a directory of "
                   "its own under --store. Default: unbounded.")
@click.option("--max-concurrent", default=Limits.max_concurrent, show_default=True, type=click.IntRange(min=1),
              help="Forecast requests in flight (per replica); more get 429 with Retry-After at once.")
@click.option("--max-body-bytes", default=Limits.max_body_bytes, show_default=True, type=click.IntRange(min=1),
              help="Larger request bodies get 413 (chunked ones included).")
@click.option("--deadline-s", default=Limits.deadline_s, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="A request whose forecast is not ready within this many seconds gets 504.")
@click.option("--max-wait-ms", default=Limits.max_wait_ms, show_default=True, type=click.FloatRange(min=0),
              help="Dynamic batching: how long a forecast call waits for requests already on their way (a lone "
                   "request never waits).")
@click.option("--max-batch-tokens", default=Limits.max_batch_tokens, show_default=True, type=click.IntRange(min=1),
              help="Padded tokens per LLM call when concurrent requests' store misses are embedded together.")
@click.option("--max-batch-windows", default=Limits.max_batch_windows, show_default=True, type=click.IntRange(min=0),
              help="Windows per forecast call (0: up to --max-concurrent; 1 turns dynamic batching off).")
@click.option("--api-key", envvar="TIMECMA_API_KEY", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every route but the health probes (prefer the "
                   "environment variable: a command line is visible to other users).")
@click.option("--ray", "ray_address", default=None, is_flag=False, flag_value="local", metavar="[ADDRESS]",
              help="Run on Ray Serve: alone, a local cluster; 'auto', host:port or ray://host:10001 joins one.")
@click.option("--replicas", default=None, type=click.IntRange(min=1), help="[--ray] Copies of the model (default 1).")
@click.option("--min-replicas", default=None, type=click.IntRange(min=1),
              help="[--ray] With --max-replicas: autoscale between the two on requests in flight per replica.")
@click.option("--max-replicas", default=None, type=click.IntRange(min=1))
@click.option("--cpus-per-replica", default=1.0, show_default=True, type=float, help="[--ray]")
@click.option("--gpus-per-replica", default=0.0, show_default=True, type=float, help="[--ray]")
@click.option("--ray-proxy", type=click.Choice(["auto", "haproxy", "ray"]), default="auto", show_default=True,
              help="[--ray, local cluster] auto: HAProxy where a binary is found (RAY_SERVE_ENABLE_HA_PROXY=1, "
                   "RAY_SERVE_THROUGHPUT_OPTIMIZED=1), else Ray Serve's own proxy with a warning.")
@click.option("--ray-start-timeout-s", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="[--ray, local cluster] Seconds Ray Serve gives its HTTP proxy per readiness check "
                   "(RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S; Ray's default of 5 s is missed on a busy machine).")
def serve_cmd(bundle, host, port, backend, threads, store, store_max_gb, max_concurrent, max_body_bytes, deadline_s,
              max_wait_ms, max_batch_tokens, max_batch_windows, api_key, ray_address, replicas, min_replicas,
              max_replicas, cpus_per_replica, gpus_per_replica, ray_proxy, ray_start_timeout_s):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("timecma").setLevel(logging.INFO)
    for line in bind_warnings(host, api_key):
        log.warning(line)
    try:
        limits = Limits(max_concurrent, max_body_bytes, deadline_s, max_wait_ms, max_batch_tokens, max_batch_windows)
    except InputError as exc:
        fail(PROG, exc)
    if ray_address is None:
        used = [o for o, v in (("--replicas", replicas), ("--min-replicas", min_replicas),
                               ("--max-replicas", max_replicas)) if v is not None]
        if used:
            fail(PROG, f"{', '.join(used)} need(s) --ray (the default runs one process)")
        _single_process(bundle, host, port, backend, threads, store, store_max_gb, limits, api_key)
    else:
        if (min_replicas is None) != (max_replicas is None):
            fail(PROG, "--min-replicas and --max-replicas go together")
        count = (min_replicas, max_replicas) if min_replicas is not None else (replicas or 1)
        _on_ray(bundle, host, port, backend, store, store_max_gb, limits, api_key, ray_address, count,
                cpus_per_replica, gpus_per_replica, ray_proxy, ray_start_timeout_s)


def _single_process(bundle, host, port, backend, threads, store, store_max_gb, limits, api_key) -> None:
    from timecma.core.manifest import read_manifest

    from .service import ForecastService
    from .single_process import serve

    try:
        manifest = read_manifest(bundle)
        if store is None and manifest.llm is not None:
            from .ray_batch import node_store_dir

            store = node_store_dir(manifest.llm.namespace)
        service = ForecastService(bundle, backend=backend, store=store, threads=threads, limits=limits,
                                  api_key=api_key, warm_up="background", store_max_gb=store_max_gb)
    except (InputError, BundleError, BackendUnavailable) as exc:
        fail(PROG, exc)
    click.echo(f"{PROG}: {bundle} in one process at http://{host}:{port} ({ROUTES})"
               f"{'; bearer key required' if api_key else ''}; /health says ok once warmed up; Ctrl-C stops")
    try:
        serve(service, host, port)
    except BackendUnavailable as exc:
        fail(PROG, exc)


def _on_ray(bundle, host, port, backend, store, store_max_gb, limits, api_key, ray_address, count, cpus_per_replica,
            gpus_per_replica, ray_proxy, ray_start_timeout_s) -> None:
    from timecma.core.ray_setup import unwrap

    from . import ray_serve

    try:
        proxy_line = ray_serve.connect_for_serve(ray_address, ray_proxy, ray_start_timeout_s)
        url = ray_serve.start(bundle, host=host, port=port, replicas=count, backend=backend, store=store,
                              cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica, limits=limits,
                              api_key=api_key, store_max_gb=store_max_gb)
    except (InputError, BundleError, BackendUnavailable) as exc:
        fail(PROG, exc)
    except Exception as exc:  # noqa: BLE001 (a replica's constructor error arrives wrapped by Ray)
        ours = unwrap(exc)
        fail(PROG, ours if ours is not exc else BackendUnavailable(
            f"Ray Serve failed to deploy: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"))
    shown = f"{count[0]}-{count[1]} (autoscaled)" if isinstance(count, tuple) else count
    click.echo(f"{PROG}: {shown} Ray Serve replica(s) of {bundle} at {url} via {proxy_line} ({ROUTES})"
               f"{'; bearer key required' if api_key else ''}; Ctrl-C stops")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):  # wakes up: a signal another (Ray) thread received runs its handler here
        pass
    ray_serve.shutdown()

if __name__ == "__main__":
    serve_cmd()
