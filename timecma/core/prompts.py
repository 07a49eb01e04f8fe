"""Prompt rendering shared by training and serving (torch-free).

The default template reproduces the public TimeCMA reference byte for byte (docs/design.md §3).
Serving must render exactly the prompts training saw, so the template is identified by
name and by a content hash that every checkpoint and bundle records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from .errors import InputError

# Frequency name -> (words after "every", timestamp format). Names are what
# ``infer_frequency`` returns and what checkpoints record.
FREQUENCIES: dict[str, tuple[str, str]] = {
    "hourly": ("hour", "%d/%m/%Y %H:00"),
    "15min": ("15 minutes", "%d/%m/%Y %H:%M"),
    "10min": ("10 minutes", "%d/%m/%Y %H:%M"),
    "daily": ("day", "%d/%m/%Y"),
    "weekly": ("week", "%d/%m/%Y"),
    "monthly": ("month", "%d/%m/%Y"),
}

# Step of each frequency in seconds; monthly is checked by calendar month instead.
FREQUENCY_SECONDS: dict[str, int] = {
    "hourly": 3600,
    "15min": 900,
    "10min": 600,
    "daily": 86400,
    "weekly": 7 * 86400,
}


@dataclass(frozen=True)
class PromptTemplate:
    """A named prompt template; ``value_format`` says how each raw value is written."""

    name: str
    text: str
    value_format: str  # "int": str(int(v)), truncation toward zero; "sig4": f"{v:.4g}"; "fixed3": f"{v:.3f}"
    trend_format: str = "{:0f}"
    value_transform: str = "none"  # "log": values (and trend) after the log scaler fitted on training rows

    def spec(self) -> dict:
        d = asdict(self)
        if self.value_transform == "none":  # templates from before the field keep their hash
            d.pop("value_transform")
        return d

    @property
    def needs_periods(self) -> bool:
        """Whether prompts carry each variable's period and lag features (the `lags` template)."""
        return "{lags}" in self.text

    @property
    def hash(self) -> str:
        """Content hash: any change to text or formatting rules changes it."""
        payload = json.dumps({**self.spec(), "frequencies": FREQUENCIES}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


TEMPLATES: dict[str, PromptTemplate] = {
    "reference": PromptTemplate(
        name="reference",
        text="From {start} to {end}, the values were {values} every {every}. "
        "The total trend value was {trend}",
        value_format="int",
    ),
    "sig4": PromptTemplate(
        name="sig4",
        text="From {start} to {end}, the values were {values} every {every}. "
        "The total trend value was {trend}",
        value_format="sig4",
    ),
    # the reference prompt plus the variable's detected period and lag features (core.seasonality)
    # the founding joint-training design's tokenisation: per variable an offset making values positive, log,
    # standardise on training rows, clip at +-20 (core.scaling's log scaler), three decimals
    "log-values": PromptTemplate(
        name="log-values",
        text="From {start} to {end}, the values were {values} every {every}. "
        "The total trend value was {trend}",
        value_format="fixed3",
        trend_format="{:.3f}",
        value_transform="log",
    ),
    "lags": PromptTemplate(
        name="lags",
        text="From {start} to {end}, the values were {values} every {every}. "
        "The total trend value was {trend}. {lags}",
        value_format="int",
    ),
}
LAGS_TEXT = ("The period was {period} steps; one period back the value was {lag1}, two periods back {lag2}; "
             "over the last period the mean was {mean}, the minimum {min} and the maximum {max}; the last period "
             "correlated {xcorr} with the one before")
NO_PERIOD_TEXT = "No seasonal period was detected"
DEFAULT_TEMPLATE = "reference"


class PromptError(InputError):
    """A prompt cannot be rendered (unknown template or frequency, bad values)."""


def get_template(name: str, expected_hash: str | None = None) -> PromptTemplate:
    """Look a template up by name; refuse it if its hash differs from a recorded one."""
    if name not in TEMPLATES:
        raise PromptError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}")
    template = TEMPLATES[name]
    if expected_hash is not None and template.hash != expected_hash:
        raise PromptError(
            f"prompt template {name!r} has hash {template.hash[:12]} here but the model was "
            f"trained with hash {expected_hash[:12]}: prompts would differ from training"
        )
    return template


def format_values(values: np.ndarray, value_format: str) -> list[str]:
    """Render raw values as the template writes them (vectorised once per column)."""
    if value_format == "int":
        # str(int(v)) truncates toward zero, like the reference; int64 truncates the same way
        # and converts in one call wherever every value is exactly representable.
        values = np.asarray(values, dtype=np.float64)
        if values.size and np.abs(values).max() < 2.0 ** 53:
            return list(map(str, values.astype(np.int64).tolist()))
        return [str(int(v)) for v in values.tolist()]
    if value_format == "sig4":
        return [f"{v:.4g}" for v in np.asarray(values, dtype=np.float64).tolist()]
    if value_format == "fixed3":
        return [f"{v:.3f}" for v in np.asarray(values, dtype=np.float64).tolist()]
    raise PromptError(f"unknown value format {value_format!r}")


def format_timestamp(ts: np.datetime64, frequency: str) -> str:
    """Render one timestamp in the frequency's date format."""
    if frequency not in FREQUENCIES:
        raise PromptError(f"unknown frequency {frequency!r}; known: {sorted(FREQUENCIES)}")
    import datetime as _dt

    dt = ts.astype("datetime64[us]").astype(_dt.datetime)
    return dt.strftime(FREQUENCIES[frequency][1])


def trend_value(raw_window: np.ndarray) -> float:
    """Sum of first differences of the raw window (the reference's 'total trend')."""
    return float(np.diff(np.asarray(raw_window, dtype=np.float64)).sum())


class PromptRenderer:
    """Renders prompts for every (window, variable) of one series.

    Value strings are computed once per row and column, so rendering thousands of
    overlapping windows costs one string join each.
    """

    def __init__(self, template: PromptTemplate, frequency: str, periods: Sequence[int | None] | None = None,
                 log_scaler: dict | None = None):
        if frequency not in FREQUENCIES:
            raise PromptError(f"unknown frequency {frequency!r}; known: {sorted(FREQUENCIES)}")
        self.value_scaler = None
        if template.value_transform == "log":
            if not log_scaler:
                raise PromptError(f"template {template.name!r} needs the log scaler fitted on the training rows")
            from .scaling import Scaler

            self.value_scaler = Scaler("log", np.asarray(log_scaler["mean"], np.float64),
                                       np.asarray(log_scaler["std"], np.float64),
                                       np.asarray(log_scaler["offset"], np.float64))
        self.template = template
        self.frequency = frequency
        self.every = FREQUENCIES[frequency][0]
        self.with_lags = template.needs_periods
        if self.with_lags and periods is None:
            raise PromptError(f"template {template.name!r} needs each variable's period (detected at training)")
        self.periods = list(periods) if periods is not None else None

    @classmethod
    def from_record(cls, record: dict, frequency: str) -> "PromptRenderer":
        """The renderer a checkpoint's or bundle's prompt record describes (template checked by hash)."""
        return cls(get_template(record["name"], record["hash"]), frequency, record.get("periods"),
                   record.get("log_scaler"))

    def _lags(self, window: np.ndarray, j: int) -> str:
        from .seasonality import lag_features

        assert self.periods is not None, "lag features without periods (the constructor requires them)"
        p = self.periods[j] if j < len(self.periods) else None
        if not p:
            return NO_PERIOD_TEXT
        f = lag_features(window, p)

        def num(v: float) -> str:
            return "n/a" if not np.isfinite(v) else format_values(np.array([v]), self.template.value_format)[0]

        return LAGS_TEXT.format(period=p, lag1=num(f["lag1"]), lag2=num(f["lag2"]), mean=f"{f['mean']:.2f}",
                                min=num(f["min"]), max=num(f["max"]),
                                xcorr="n/a" if not np.isfinite(f["xcorr"]) else f"{f['xcorr']:.2f}")

    def render_series(
        self,
        raw: np.ndarray,
        timestamps: np.ndarray,
        starts: Sequence[int] | np.ndarray,
        seq_len: int,
    ) -> list[str]:
        """Prompts for windows ``raw[s:s+seq_len]`` for each start, variable-major inside a window.

        Returns ``len(starts) * N`` prompts ordered window by window, then variable.
        """
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim != 2:
            raise PromptError(f"raw values must be [T, N], got shape {raw.shape}")
        if not np.isfinite(raw).all():
            raise PromptError("raw values contain NaN or inf")
        if self.value_scaler is not None:  # the template writes (and trends) the log-scaled values
            raw = self.value_scaler.transform(raw)
        n_vars = raw.shape[1]
        cols = [format_values(raw[:, j], self.template.value_format) for j in range(n_vars)]
        stamps: dict[int, str] = {}

        def stamp(i: int) -> str:
            if i not in stamps:
                stamps[i] = format_timestamp(timestamps[i], self.frequency)
            return stamps[i]

        text = self.template.text
        out: list[str] = []
        for s in starts:
            e = s + seq_len
            if s < 0 or e > raw.shape[0]:
                raise PromptError(f"window [{s}, {e}) is outside the series of {raw.shape[0]} rows")
            start, end = stamp(s), stamp(e - 1)
            # every column's trend at once; rows of a contiguous transpose sum like trend_value's 1-D sum
            trends = np.diff(np.ascontiguousarray(raw[s:e].T), axis=1).sum(axis=1).tolist()
            for j in range(n_vars):
                fields = dict(start=start, end=end, values=", ".join(cols[j][s:e]), every=self.every,
                              trend=self.template.trend_format.format(trends[j]))
                if self.with_lags:
                    fields["lags"] = self._lags(raw[s:e, j], j)
                out.append(text.format(**fields))
        return out

    def render_window(self, raw_window: np.ndarray, timestamps: np.ndarray) -> list[str]:
        """Prompts for one window [seq_len, N] (one per variable)."""
        return self.render_series(raw_window, timestamps, [0], raw_window.shape[0])
