"""The one timing loop (benchmarks, export's graph choices): wall-clock per call, in ms."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np


def time_calls(fn: Callable[[int], Any], iters: int, warmup: int = 0, budget_s: float | None = None,
               min_iters: int = 3) -> tuple[list[float], list[Any]]:
    """Call ``fn(-1)`` ``warmup`` times, then ``fn(k)`` for k = 0.. up to ``iters`` times, stopping early
    once ``budget_s`` seconds have passed and ``min_iters`` calls ran. Returns (ms per call, results)."""
    for _ in range(warmup):
        fn(-1)
    ms: list[float] = []
    results: list[Any] = []
    start = time.perf_counter()
    for k in range(iters):
        t = time.perf_counter()
        results.append(fn(k))
        ms.append((time.perf_counter() - t) * 1000)
        if budget_s is not None and k + 1 >= min_iters and time.perf_counter() - start > budget_s:
            break
    return ms, results


def summarize(ms: list[float]) -> dict:
    """p50 / p90 / p99 / mean / n of a list of milliseconds."""
    a = np.asarray(ms, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}
