"""Dynamic batching for the endpoint: the windows of concurrent requests in one ``predict_many`` call.

A request's window joins a queue; one worker thread (the only one that forecasts) takes every window
waiting there, and, while other admitted requests are still on their way (parsed, not yet queued),
what arrives within ``max_wait_s`` of the first, at most ``max_windows``; then forecasts them together:
their store misses are embedded in LLM calls cut by ``plan_llm_batches`` under the forecaster's token
budget (``llm_batch_tokens``) and the engines' profiles, and their forecaster inputs go through one
forecaster call. Right padding with an attention mask and a last-token gather make each answer the
batch-1 answer within fp32 rounding. A lone request never waits for company it cannot get, and one
whose window is stored (the head alone, well under a millisecond) is forecast on the caller's thread
when the worker is idle (``run_if_idle``): at one client the endpoint adds its HTTP work, no hand-off.

Our own queue rather than Ray Serve's ``@serve.batch``: the batch has to form after admission (the
429/413/401 answers are immediate and never wait for a batch), a request that gives up at its
deadline must leave the batch it was waiting for, and the same code runs (and is tested) without Ray.

The worker thread survives whatever a batch raises (the requests of that batch get the error); if it
ends anyway (``alive`` turns false), every waiting request is answered with ``BatcherStopped`` and the
endpoint stops reporting ready. Bookkeeping after a batch (``on_batch``: metrics) that raises is logged and
counted (``failed_bookkeeping``), never given to requests whose forecast is already there. ``stop()`` ends
the thread after the batch it runs (shutdown), and answers what is still queued with ``BatcherStopped``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from timecma.core.errors import InputError

log = logging.getLogger(__name__)


class DeadlineExceeded(TimeoutError):
    """The request's forecast was not ready within its deadline."""


class BatcherStopped(RuntimeError):
    """The forecasting thread has ended: nothing will answer this request."""


@dataclass(eq=False)
class _Item:
    values: np.ndarray
    timestamps: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None  # set for submit_async: answered through this loop
    future: asyncio.Future | None = None
    y: np.ndarray | None = None
    error: BaseException | None = None
    cancelled: bool = False

    def finish(self) -> None:
        """Hand the answer (``y`` or ``error``) to the waiting request, on its own loop or thread."""
        self.done.set()
        if self.future is not None and self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(_resolve, self.future, self.y, self.error)
            except RuntimeError:  # the loop has closed: nobody waits any more
                pass


def _expire(item: _Item, timeout_s: float) -> None:
    """On the loop, at the deadline: the request gives up (a batch that has not started drops it)."""
    fut = item.future
    if fut is not None and not fut.done():
        item.cancelled = True
        fut.set_exception(DeadlineExceeded(f"the forecast was not ready within {timeout_s:g} s"))


def _resolve(fut: asyncio.Future, y, error) -> None:
    if not fut.done():  # not already given up at its deadline
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(y)


_STOPPED = "the forecasting thread has stopped; this replica cannot forecast"
_STOP = _Item(np.empty(0), np.empty(0))  # queued by stop(): wakes the worker, which then ends


class WindowBatcher:
    """``submit(values, timestamps, timeout_s) -> forecast`` (or ``await submit_async(...)``), served in
    batches by one worker thread.

    ``on_batch(windows)`` is called after each batch is forecast and before its requests are answered, on
    the worker thread (for metrics: a client that has its answer finds its batch counted), and after a window
    served on the caller's thread by ``run_if_idle``: it may run on two threads at once and must be
    thread-safe. What it raises is logged and counted in ``failed_bookkeeping``, never a request's error.
    ``arriving()`` is a context manager around the time an admitted request spends before it queues its
    window (reading and parsing it), so that a batch waits only for requests that are actually on their way."""

    def __init__(self, forecaster, max_windows: int, max_wait_s: float,
                 on_batch: Callable[[int], None] | None = None):
        self.f, self.max_windows, self.max_wait_s = forecaster, max(1, int(max_windows)), max(0.0, max_wait_s)
        self.on_batch = on_batch
        self.failed_batches = 0  # batches whose forecast raised something other than InputError
        self.failed_bookkeeping = 0  # on_batch calls that raised (the forecasts they followed were answered)
        self._q: queue.SimpleQueue[_Item] = queue.SimpleQueue()  # C-level put/get: one wake-up, no Condition
        self._arriving = 0
        self._busy = False  # the worker is forecasting a batch
        self._count_lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="timecma-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the forecasting thread runs (readiness depends on it)."""
        return self._thread.is_alive() and not self._stopped.is_set()

    # -- the request side ---------------------------------------------------------------------
    def arriving(self) -> "_Arriving":
        return _Arriving(self)

    def _put(self, item: _Item) -> None:
        if not self.alive:
            raise BatcherStopped(_STOPPED)
        self._q.put(item)
        if self._stopped.is_set():  # stopped between the check and the put: the drain may have missed it
            self._drain()

    def submit(self, values: np.ndarray, timestamps: np.ndarray, timeout_s: float) -> np.ndarray:
        """Blocks the calling thread until the forecast is ready (for callers outside an event loop)."""
        item = _Item(values, timestamps)
        self._put(item)
        if not item.done.wait(timeout_s):
            item.cancelled = True  # dropped from a batch that has not started; a running one just finishes
            raise DeadlineExceeded(f"the forecast was not ready within {timeout_s:g} s")
        if item.error is not None:
            raise item.error
        assert item.y is not None
        return item.y

    async def submit_async(self, values: np.ndarray, timestamps: np.ndarray, timeout_s: float) -> np.ndarray:
        """The same, awaited on an event loop (which keeps serving meanwhile): one cross-thread wake-up each
        way, no worker thread of the loop's pool held while the forecast waits or runs."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        item = _Item(values, timestamps, loop=loop, future=fut)
        self._put(item)
        timer = loop.call_later(timeout_s, _expire, item, timeout_s)
        try:
            return await fut
        finally:
            timer.cancel()

    def run_if_idle(self, values: np.ndarray, timestamps: np.ndarray) -> np.ndarray | None:
        """The forecast of a lone request's window on the caller's thread, when it is a stored window (the
        head alone: well under a millisecond) and the worker is idle (nothing queued or on its way, no batch
        running); else None at once. No hand-off to the worker and back: at one client the endpoint adds only
        its HTTP work to the forecast. Anything longer goes to the worker, so an event loop never blocks on
        an LLM call."""
        if not self.alive or self._busy or self._arriving > 0 or not self._q.empty():
            return None
        y = self.f.predict_if_stored(values, timestamps)
        if y is not None:
            self._observe(1)
        return y

    def _observe(self, windows: int) -> None:
        """``on_batch(windows)``; bookkeeping that fails is logged and counted, and never fails a forecast."""
        if self.on_batch is None:
            return
        try:
            self.on_batch(windows)
        except Exception:  # noqa: BLE001 (metrics must not turn a correct forecast into an error)
            with self._count_lock:
                self.failed_bookkeeping += 1
            log.exception("bookkeeping after a forecast of %d window(s) failed; the forecast is answered", windows)

    # -- the worker thread --------------------------------------------------------------------
    def _take(self) -> list[_Item]:
        batch = [self._q.get()]
        end = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_windows:
            try:
                batch.append(self._q.get_nowait())
                continue
            except queue.Empty:
                pass
            left = end - time.monotonic()
            if self._arriving <= 0 or left <= 0:  # nobody else on the way, or waited long enough
                break
            try:
                batch.append(self._q.get(timeout=left))
            except queue.Empty:
                break
        return [b for b in batch if not b.cancelled]

    def _loop(self) -> None:
        try:
            while True:
                batch = self._take()
                if self._stopped.is_set():  # stop(): what was taken with its sentinel is answered, not forecast
                    for b in batch:
                        if b is not _STOP:
                            b.error = BatcherStopped(_STOPPED)
                            b.finish()
                    return
                batch = [b for b in batch if b is not _STOP]
                if not batch:
                    continue
                self._busy = True
                try:
                    try:
                        self._run(batch)
                    except Exception as exc:  # noqa: BLE001 (the thread must outlive any one batch)
                        self.failed_batches += 1
                        log.exception("forecast batch of %d window(s) failed", len(batch))
                        for b in batch:
                            if b.error is None:
                                b.y, b.error = None, exc
                    else:
                        self._observe(len(batch))  # never fails the batch: its answers stand
                finally:
                    self._busy = False
                    for b in batch:
                        b.finish()
        finally:
            if not self._stopped.is_set():  # only a BaseException (SystemExit, KeyboardInterrupt...) gets here
                self._stopped.set()
                log.error("the forecasting thread has stopped; requests are refused from now on")
            self._drain()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the forecasting thread (shutdown): the batch it runs finishes, requests still queued (and any
        that come later) are answered with ``BatcherStopped``. True once the thread has ended, False if the
        running batch outlasted ``timeout_s`` (the thread then ends after it, answering what queued)."""
        self._stopped.set()
        self._q.put(_STOP)  # wakes a worker waiting for work
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        self._drain()
        return not self._thread.is_alive()

    def _drain(self) -> None:
        """Answer what is queued with ``BatcherStopped`` (stop's wake-up sentinel stays for the worker)."""
        woken = False
        while True:
            try:
                b = self._q.get_nowait()
            except queue.Empty:
                break
            if b is _STOP:
                woken = True
                continue
            b.error = BatcherStopped(_STOPPED)
            b.finish()
        if woken:  # a worker still finishing its batch must find it, or it would wait for work forever
            self._q.put(_STOP)

    def _run(self, batch: list[_Item]) -> None:
        """Forecast the batch; an ``InputError`` is the offending window's alone (each window is then
        forecast on its own), any other exception propagates to ``_loop``."""
        try:
            ys = self.f.predict_many(np.stack([b.values for b in batch]), np.stack([b.timestamps for b in batch]),
                                     window_records=True)
            for b, y in zip(batch, ys):
                b.y = y
        except InputError as exc:
            if len(batch) == 1:
                batch[0].error = exc
            else:  # one bad window must not fail its neighbours: each alone, with its own message
                for b in batch:
                    self._run([b])


class _Arriving:
    """``with batcher.arriving(): ...`` counts a request that will queue a window soon."""

    __slots__ = ("b",)

    def __init__(self, batcher: WindowBatcher):
        self.b = batcher

    def __enter__(self) -> None:
        with self.b._count_lock:
            self.b._arriving += 1

    def __exit__(self, *exc) -> None:
        with self.b._count_lock:
            self.b._arriving -= 1
