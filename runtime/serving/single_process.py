"""The default way to run the endpoint: the app in this one process on uvicorn, no Ray on the request path.

One event loop (uvloop and httptools where installed) parses, admits, validates and answers; the
batcher's thread forecasts. Measured on a 2-core VM, FastAPI on uvicorn adds about 0.35 ms per request
to the forecast; nothing else to start (``pip install 'timecma[serve]'``). Scale out with ``--ray``.

``serve(service, host, port)`` blocks until SIGINT/SIGTERM (uvicorn's graceful shutdown: requests in
flight are answered), then closes the service (the store, and a bounded store's lock).
``BackgroundServer`` runs the same server on a thread, for tests and benchmarks.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
import threading
import time

from timecma.core.errors import BackendUnavailable

from .service import ForecastService

log = logging.getLogger(__name__)


def server(service: ForecastService, host: str = "127.0.0.1", port: int = 8000, *, sock: socket.socket | None = None,
           log_level: str = "warning"):
    """A ``uvicorn.Server`` for the service's app (no access log: it costs more than the rest of the HTTP path)."""
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - the [serve] extra brings it
        raise BackendUnavailable("timecma-serve needs uvicorn and FastAPI: pip install 'timecma[serve]'") from exc
    from .app import create_app

    config = uvicorn.Config(create_app(service), host=host, port=port, access_log=False, log_level=log_level,
                            server_header=False, lifespan="off", timeout_graceful_shutdown=10,
                            proxy_headers=False)
    return uvicorn.Server(config)


def serve(service: ForecastService, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGINT/SIGTERM (a stop asked for, not an error: the caller exits 0); then close the service."""
    srv = server(service, host, port)
    # once warm, what is alive now stays alive: the collector stops walking it on every full collection
    def freeze_when_warm() -> None:
        service.wait_ready()
        gc.freeze()

    threading.Thread(target=freeze_when_warm, name="timecma-gc-freeze", daemon=True).start()
    # uvicorn re-raises the signal it stopped on once it has shut down, to the handler in place before it ran
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        srv.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.close()
    if not srv.started:
        raise BackendUnavailable(f"could not listen on {host}:{port} (in use, or not an address of this machine); "
                                 "see the message above")


class BackgroundServer:
    """``with BackgroundServer(service) as url: ...``: the single-process server on a thread, on a free
    loopback port (or ``port``), started and stopped around the block."""

    def __init__(self, service: ForecastService, host: str = "127.0.0.1", port: int = 0):
        self.service = service
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._srv = server(service, self.host, self.port)
        self._thread = threading.Thread(target=self._srv.run, kwargs={"sockets": [self._sock]},
                                        name="timecma-uvicorn", daemon=True)

    def start(self, timeout_s: float = 30.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._srv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        self._srv.should_exit = True
        self._thread.join(15)
        self._sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
