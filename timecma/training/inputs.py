"""A run's inputs before any model: the series, its splits and windows, the scalers fitted on training rows,
the detected seasonality and the prompt record serving needs to render the same prompts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.config import DataContract
from ..core.prompts import get_template
from ..core.scaling import Scaler
from ..core.seasonality import detect_periods, primary_periods
from ..data import Series, load_series, make_windows, resolve_split, split_borders


@dataclass
class RunData:
    """Everything about the data that the later steps read; metrics are reported in ``reported``'s units
    (the paper's: standard-normalised raw values) whatever ``scaler`` the model trains on."""

    series: Series
    windows: dict  # split name -> its windows (make_windows)
    scaler: Scaler
    scaled: np.ndarray
    report: Scaler
    reported: np.ndarray
    prompt_record: dict
    residual_periods: list[int | None] | None
    contract: DataContract

    def to_report(self, y: np.ndarray) -> np.ndarray:
        """Model outputs -> the reporting units."""
        return y if self.scaler.kind == "standard" else self.report.transform(self.scaler.inverse(y))


def prepare_data(data_path: str, time_col: str, split: str, seq_len: int, pred_len: int, train_stride: int,
                 eval_stride: int, scaler_kind: str, template: str, residual: str) -> RunData:
    """Load and split the series; fit every scaler and detect seasonality on training rows only."""
    series = load_series(data_path, time_col)
    split = resolve_split(split, data_path)
    borders = split_borders(len(series.values), seq_len, split, series.frequency)
    windows = make_windows(borders, seq_len, pred_len, train_stride, eval_stride)
    train_rows = series.values[borders["train"][0]:borders["train"][1]]
    scaler = Scaler.fit(train_rows, series.variables, scaler_kind)
    report = Scaler.fit(train_rows, series.variables)
    tmpl = get_template(template)
    n_vars = len(series.variables)
    # seasonality from training rows only: in the checkpoint, the `lags` prompts and the residual
    periods = detect_periods(train_rows, max_period=seq_len)
    prompt_periods = primary_periods(periods, n_vars, series.frequency, seq_len, fallback=False)
    residual_periods = (primary_periods(periods, n_vars, series.frequency, seq_len, fallback=True)
                        if residual != "none" else None)
    # what serving needs to render the same prompts: template, periods (`lags`), log scaler (`log-values`)
    prompt_record: dict[str, Any] = {"name": tmpl.name, "hash": tmpl.hash,
                     **({"periods": prompt_periods} if tmpl.needs_periods else {})}
    if tmpl.value_transform == "log":
        z = Scaler.fit(train_rows, series.variables, "log")
        assert z.offset is not None, "a log scaler has its offset"
        prompt_record["log_scaler"] = {"offset": z.offset.tolist(), "mean": z.mean.tolist(), "std": z.std.tolist()}
    contract = DataContract(
        time_col=time_col, variables=series.variables, frequency=series.frequency, seq_len=seq_len,
        pred_len=pred_len, split=split, source=os.path.abspath(data_path), periods=periods, **scaler.to_contract(),
        raw_std=report.std.tolist(),
    )
    return RunData(series, windows, scaler, scaler.transform(series.values), report, report.transform(series.values),
                   prompt_record, residual_periods, contract)
