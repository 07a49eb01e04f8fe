"""Dynamic batching for the endpoint: the windows of concurrent requests in one ``predict_many`` call.

A request's window joins a queue; one worker thread takes what arrives within ``max_wait_s`` of the
first (at most ``max_windows``) and forecasts them together: their store misses are embedded in LLM
calls cut by ``plan_llm_batches`` under the forecaster's token budget (``llm_batch_tokens``) and the
engines' profiles, and their forecaster inputs go through one forecaster call. Right padding with an
attention mask and a last-token gather make each answer the batch-1 answer within fp32 rounding.

Our own queue rather than Ray Serve's ``@serve.batch``: the batch has to form after admission (the
429/413/401 answers are immediate and never wait for a batch), a request that gives up at its
deadline must leave the batch it was waiting for, and the same code runs (and is tested) without Ray.
"""

from __future__ import annotations

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


@dataclass
class _Item:
    values: np.ndarray
    timestamps: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    y: np.ndarray | None = None
    error: BaseException | None = None
    cancelled: bool = False


class WindowBatcher:
    """``submit(values, timestamps, timeout_s) -> forecast``, served in batches by one worker thread.

    ``on_batch(windows)`` is called after each batch, on the worker thread (for metrics)."""

    def __init__(self, forecaster, max_windows: int, max_wait_s: float,
                 on_batch: Callable[[int], None] | None = None):
        self.f, self.max_windows, self.max_wait_s = forecaster, max(1, int(max_windows)), max(0.0, max_wait_s)
        self.on_batch = on_batch
        self._q: queue.Queue[_Item] = queue.Queue()
        threading.Thread(target=self._loop, name="timecma-batcher", daemon=True).start()

    def submit(self, values: np.ndarray, timestamps: np.ndarray, timeout_s: float) -> np.ndarray:
        item = _Item(values, timestamps)
        self._q.put(item)
        if not item.done.wait(timeout_s):
            item.cancelled = True  # dropped from a batch that has not started; a running one just finishes
            raise DeadlineExceeded(f"the forecast was not ready within {timeout_s} s")
        if item.error is not None:
            raise item.error
        return item.y

    def _loop(self) -> None:
        while True:
            batch = [self._q.get()]
            end = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_windows:
                try:
                    batch.append(self._q.get(timeout=max(0.0, end - time.monotonic())))
                except queue.Empty:
                    break
            batch = [b for b in batch if not b.cancelled]
            if batch:
                self._run(batch)
                if self.on_batch:
                    self.on_batch(len(batch))

    def _run(self, batch: list[_Item]) -> None:
        try:
            ys = self.f.predict_many(np.stack([b.values for b in batch]), np.stack([b.timestamps for b in batch]))
            for b, y in zip(batch, ys):
                b.y = y
        except InputError as exc:
            if len(batch) == 1:
                batch[0].error = exc
            else:  # one bad window must not fail its neighbours: each alone, with its own message
                for b in batch:
                    self._run([b])
        except Exception as exc:  # noqa: BLE001 (handed to the waiting request, which answers 500)
            log.exception("forecast batch of %d failed", len(batch))
            for b in batch:
                b.error = exc
        finally:
            for b in batch:
                b.done.set()
