"""Loading, validating, splitting and windowing multivariate series (docs/design.md §2)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .core.prompts import FREQUENCY_SECONDS
from .core.errors import InputError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DataError(InputError):
    """Input data is unusable; the message names the file, column or row."""


@dataclass
class Series:
    """A validated table: timestamps [T] and raw values [T, N] in file order."""

    path: str
    time_col: str
    variables: list[str]
    timestamps: np.ndarray  # datetime64[ns]
    values: np.ndarray  # float64 [T, N], raw units
    frequency: str


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read CSV or Parquet by extension."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"data file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if ext in (".csv", ".txt"):
            return pd.read_csv(path)
    except Exception as exc:  # parser errors name the file
        raise DataError(f"cannot read {path}: {exc}") from exc
    raise DataError(f"{path}: unsupported extension {ext!r} (use .csv or .parquet)")


def infer_frequency(timestamps: np.ndarray) -> str:
    """Name of the series' step (hourly, 15min, ...), from the median step."""
    if len(timestamps) < 2:
        raise DataError("need at least two timestamps to infer the frequency")
    steps = np.diff(timestamps.astype("datetime64[s]").astype(np.int64))
    median = int(np.median(steps))
    for name, seconds in FREQUENCY_SECONDS.items():
        if median == seconds:
            return name
    if 28 * 86400 <= median <= 31 * 86400:
        return "monthly"
    raise DataError(f"unsupported time step of {median} s; supported: {sorted(FREQUENCY_SECONDS)} and monthly")


def validate_frame(
    df: pd.DataFrame, path: str, time_col: str, variables: list[str] | None = None
) -> Series:
    """Check columns, values and timestamps; return the series in file (or given) order."""
    if time_col not in df.columns:
        raise DataError(f"{path}: no timestamp column {time_col!r} (columns: {list(df.columns)})")
    others = [c for c in df.columns if c != time_col]
    if variables is None:
        bad = [c for c in others if not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            raise DataError(f"{path}: non-numeric column(s) {bad}; every column but {time_col!r} must be a numeric variable")
        variables = others
    else:
        missing = [v for v in variables if v not in df.columns]
        if missing:
            raise DataError(f"{path}: missing variable column(s) {missing}")
        bad = [c for c in variables if not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            raise DataError(f"{path}: non-numeric variable column(s) {bad}")
    if not variables:
        raise DataError(f"{path}: no variable columns besides {time_col!r}")
    try:
        ts = pd.to_datetime(df[time_col]).to_numpy(dtype="datetime64[ns]")
    except Exception as exc:
        raise DataError(f"{path}: column {time_col!r} is not parseable as timestamps: {exc}") from exc
    if pd.isna(ts).any():
        row = int(np.flatnonzero(pd.isna(ts))[0])
        raise DataError(f"{path}: missing timestamp at row {row}")
    steps = np.diff(ts.astype(np.int64))
    if (steps == 0).any():
        row = int(np.flatnonzero(steps == 0)[0]) + 1
        raise DataError(f"{path}: duplicate timestamp {ts[row]} at row {row}")
    if (steps < 0).any():
        row = int(np.flatnonzero(steps < 0)[0]) + 1
        raise DataError(f"{path}: timestamps not sorted: row {row} ({ts[row]}) is before row {row - 1}")
    values = df[variables].to_numpy(dtype=np.float64)
    bad_mask = ~np.isfinite(values)
    if bad_mask.any():
        r, c = (int(a[0]) for a in np.nonzero(bad_mask))
        raise DataError(f"{path}: non-finite value {values[r, c]} in column {variables[c]!r} at row {r}")
    return Series(path, time_col, list(variables), ts, values, infer_frequency(ts))


def load_series(path: str | os.PathLike, time_col: str = "date") -> Series:
    """Read and validate a CSV/Parquet file of one multivariate series."""
    path = os.fspath(path)
    return validate_frame(read_table(path), path, time_col)


def split_borders(n_rows: int, seq_len: int, split: str, frequency: str) -> dict[str, tuple[int, int]]:
    """Row ranges [b1, b2) of each split; val/test start seq_len rows early."""
    if split == "ett":
        scale = 4 if frequency == "15min" else 1
        n_train, n_val, n_test = 12 * 30 * 24 * scale, 4 * 30 * 24 * scale, 4 * 30 * 24 * scale
        if n_rows < n_train + n_val + n_test:
            raise DataError(
                f"the 'ett' split needs {n_train + n_val + n_test} rows, the file has {n_rows}; use --split ratio"
            )
        b2 = [n_train, n_train + n_val, n_train + n_val + n_test]
    elif split == "ratio":
        n_train, n_test = int(n_rows * 0.7), int(n_rows * 0.2)
        b2 = [n_train, n_rows - n_test, n_rows]
    else:
        raise DataError(f"unknown split convention {split!r} (use 'ett' or 'ratio')")
    b1 = [0, b2[0] - seq_len, b2[1] - seq_len]
    return {name: (b1[i], b2[i]) for i, name in enumerate(SPLITS)}


def resolve_split(split: str, path: str) -> str:
    """'auto' means 'ett' for ETT files (by name) and 'ratio' otherwise."""
    if split != "auto":
        return split
    return "ett" if os.path.basename(path).upper().startswith("ETT") else "ratio"


@dataclass
class SplitWindows:
    """Windows of one split: start rows into the full series."""

    name: str
    starts: np.ndarray  # window starts (row of first input step)
    seq_len: int
    pred_len: int


def make_windows(
    borders: dict[str, tuple[int, int]], seq_len: int, pred_len: int, train_stride: int = 1, eval_stride: int = 1
) -> dict[str, SplitWindows]:
    """Sliding windows of each split: stride 1 as the paper, or every ``train_stride``-th training
    window and every ``eval_stride``-th validation/test window (one deterministic subsample, for
    LLMs too slow to embed every window); fail if a split has none."""
    out = {}
    for name, (b1, b2) in borders.items():
        n = (b2 - b1) - seq_len - pred_len + 1
        if n < 1:
            raise DataError(
                f"the {name} split has {b2 - b1} rows, fewer than one window of "
                f"seq_len + pred_len = {seq_len + pred_len}"
            )
        stride = train_stride if name == "train" else eval_stride
        out[name] = SplitWindows(name, np.arange(b1, b1 + n, stride), seq_len, pred_len)
    return out
