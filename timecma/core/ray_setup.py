"""Joining a Ray cluster the same way from every command (docs/design.md §13); Ray is imported lazily.

Three things every Ray entry point needs and would otherwise repeat: connect (a local
cluster without the dashboard and with Ray's token authentication, or an existing one by address), size an
actor pool so that Ray Data's read and shuffle tasks still get a CPU (a pool that takes
every CPU hangs without an error), and turn the exception Ray wraps around a worker's
``InputError`` back into that error, so the CLIs keep their exit codes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .errors import BackendUnavailable, BundleError, InputError

log = logging.getLogger(__name__)

LOCAL = "local"


@dataclass(frozen=True)
class RayPool:
    """Where and how wide a Ray job runs: execution settings, never part of a checkpoint or bundle."""

    address: str | None = LOCAL
    num_workers: int = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0.0


def local_auth() -> str:
    """The one rule for Ray's authentication on a cluster we start: Ray's ports (GCS, raylet, object manager,
    workers) listen beyond loopback, so token authentication is on (``RAY_AUTH_MODE=token``; Ray keeps the
    token in ``~/.ray/auth_token``) unless the user set ``RAY_AUTH_MODE`` themselves, which is obeyed (with
    a warning where it turns authentication off). Returns the mode. Set before ``ray.init``: the cluster's
    processes read it when they start."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None:
        os.environ["RAY_AUTH_MODE"] = mode = "token"
    elif mode.strip().lower() == "disabled":
        log.warning("RAY_AUTH_MODE=disabled: this Ray cluster's ports (GCS, raylet, workers) listen on every "
                    "interface, and anyone who reaches them can run code here; unset it to keep Ray's token "
                    "authentication")
    return mode


def connect(address: str | None = LOCAL, num_cpus: int | None = None, progress: bool = True) -> None:
    """Start a local cluster (``local``/None; Ray's token authentication on, see ``local_auth``) or join
    ``address`` (``auto``, ``host:port``, ``ray://...``: the cluster's own authentication applies)."""
    local = address in (None, "", LOCAL)
    if local:
        local_auth()
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailable("Ray is not installed: pip install 'timecma[ray]'") from exc
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, num_cpus=num_cpus) if local else dict(address=address)
        ray.init(logging_level=logging.WARNING, configure_logging=True, log_to_driver=True, **kwargs)
        log.info("ray: %s cluster with %s CPUs, %s GPUs", "local" if local else address,
                 ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False
    if not progress:  # off a TTY Ray Data logs its progress every 10 s at INFO
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def actor_cpus(num_workers: int, cpus_per_worker: float | None) -> float:
    """CPUs per actor: what was asked, or a share that leaves one CPU for reading and shuffling.

    Ray Data's read and shuffle tasks take a whole CPU each; an actor pool holding every CPU
    of the cluster starves them and the job hangs with no error, so that is refused here."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0))
    if num_workers < 1:
        raise InputError("--num-workers must be at least 1")
    spare = total - 1.0
    if cpus_per_worker is None:
        if spare <= 0:
            raise InputError(f"the Ray cluster has {total:g} CPU(s); at least 2 are needed (one for workers, "
                             "one for Ray Data's read and shuffle tasks)")
        return min(1.0, spare / num_workers)
    if cpus_per_worker <= 0:
        raise InputError("--cpus-per-worker must be positive")
    if num_workers * cpus_per_worker > spare:
        raise InputError(f"{num_workers} workers x {cpus_per_worker:g} CPUs leave no CPU for Ray Data's read and "
                         f"shuffle tasks on this {total:g}-CPU cluster (the job would hang); use --cpus-per-worker "
                         f"{max(spare, 0) / num_workers:.2g} or fewer workers")
    return cpus_per_worker


def unwrap(exc: BaseException) -> BaseException:
    """Our own error inside Ray's wrappers (RayTaskError, UserCodeException, ...), else ``exc``.

    The worker's exception itself, not Ray's hybrid ``RayTaskError(InputError)``, whose text
    is a remote traceback rather than the message."""
    ours = (InputError, BundleError, BackendUnavailable)
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]  # causes and contexts may be None
    hybrid: BaseException | None = None
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, ours) and not hasattr(cause, "cause"):
            return cause
        if isinstance(e, ours):
            if not hasattr(e, "cause"):
                return e
            hybrid = hybrid or e
        stack += [cause, e.__cause__, e.__context__]
    return hybrid or exc
