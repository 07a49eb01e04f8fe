"""Timestamps a window or a series must have: strictly increasing by the model's step (torch-free; serving and
batch scoring check with the same rules)."""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .prompts import FREQUENCY_SECONDS


def timestamp_problem(ts: np.ndarray, frequency: str) -> tuple[int, str] | None:
    """First row whose timestamp is duplicated, unsorted or off the model's step, with why; else None."""
    ts = np.asarray(ts, dtype="datetime64[s]")
    if len(ts) < 2:
        return None
    steps = np.diff(ts.astype(np.int64))
    if (steps == 0).any():
        i = int(np.flatnonzero(steps == 0)[0]) + 1
        return i, f"duplicate timestamp {ts[i]}"
    if (steps < 0).any():
        i = int(np.flatnonzero(steps < 0)[0]) + 1
        return i, f"timestamps not sorted ({ts[i]} after {ts[i - 1]})"
    if frequency == "monthly":
        bad = np.flatnonzero(np.diff(ts.astype("datetime64[M]").astype(np.int64)) != 1)
    else:
        bad = np.flatnonzero(steps != FREQUENCY_SECONDS[frequency])
    if bad.size:
        i = int(bad[0]) + 1
        return i, f"step from {ts[i - 1]} to {ts[i]} does not match the model's frequency ({frequency})"
    return None


def check_timestamps(ts: np.ndarray, frequency: str, where: str = "window") -> None:
    """Strictly increasing with the model's step (monthly: one calendar month)."""
    problem = timestamp_problem(ts, frequency)
    if problem:
        raise InputError(f"{where}, row {problem[0]}: {problem[1]}")


def arrow_timestamps(col) -> np.ndarray:
    """An Arrow time column (timestamps, dates or ISO strings) as datetime64[ns]; a value that is not a timestamp
    raises ``ValueError`` (``pyarrow.ArrowInvalid`` is one) or ``TypeError``, for the caller to name."""
    import pyarrow as pa

    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        return col.cast(pa.timestamp("ns")).to_numpy(zero_copy_only=False)
    return np.array(col.to_pylist(), dtype="datetime64[ns]")
