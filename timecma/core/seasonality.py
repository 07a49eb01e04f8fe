"""Seasonality detected on training rows, and lag features computed from a window (torch-free:
training, export and the runtime all call these, so the features are computed one way).

``detect_periods``: per variable, the autocorrelation of the linearly detrended series (by FFT);
its local maxima at lags 2..max_period that clear both ``min_acf`` and the white-noise band
(2/sqrt(T)) are the significant periods, strongest first, at most ``k``; none if nothing clears.

``lag_features``: for one window and one period p: the value one and two periods back, the mean,
minimum and maximum over the last period, and the correlation between the last period and the
one before it.
"""

from __future__ import annotations

import numpy as np

# The calendar period a seasonal-naive forecast repeats where none is detected (a day of hours, ...).
NATURAL_PERIOD = {"hourly": 24, "15min": 96, "10min": 144, "daily": 7, "weekly": 52, "monthly": 12}


def autocorrelation(x: np.ndarray) -> np.ndarray:
    """ACF of a 1-D series after removing its linear trend (lags 0..T-1)."""
    x = np.asarray(x, dtype=np.float64)
    t = np.arange(len(x))
    x = x - np.polyval(np.polyfit(t, x, 1), t)
    n = 1 << (2 * len(x) - 1).bit_length()
    f = np.fft.rfft(x, n)
    acf = np.fft.irfft(f * np.conj(f), n)[: len(x)]
    return acf / acf[0] if acf[0] > 0 else np.zeros(len(x))


def detect_periods(values: np.ndarray, max_period: int, k: int = 2, min_acf: float = 0.2) -> list[list[int]]:
    """Significant periods per variable (strongest first), from training rows only."""
    values = np.asarray(values, dtype=np.float64)
    out = []
    band = max(min_acf, 2.0 / np.sqrt(len(values)))
    for j in range(values.shape[1]):
        acf = autocorrelation(values[:, j])
        hi = min(max_period, len(acf) - 2)
        lags = np.arange(2, hi + 1)
        peaks = lags[(acf[lags] > acf[lags - 1]) & (acf[lags] >= acf[lags + 1]) & (acf[lags] > band)]
        found: list[int] = []
        for p in peaks[np.argsort(-acf[peaks], kind="stable")]:
            p = _refine(values[:, j], int(p), hi)
            if p not in found:
                found.append(p)
        out.append(found[:k])
    return out


def _refine(x: np.ndarray, p: int, hi: int) -> int:
    """An ACF peak sits a lag off where a stronger, longer cycle tilts the ACF around it: take the
    neighbour (p-1, p, p+1) with the most spectral power at that period instead."""
    t = np.arange(len(x))
    x = x - np.polyval(np.polyfit(t, x, 1), t)
    cands = [c for c in (p - 1, p, p + 1) if 2 <= c <= hi]
    power = [abs(np.dot(x, np.exp(-2j * np.pi * t / c))) for c in cands]
    return cands[int(np.argmax(power))]


def lag_features(window: np.ndarray, period: int) -> dict[str, float]:
    """Features of one variable's window [L] for period p (p <= L/2 gives both lags and the correlation)."""
    w = np.asarray(window, dtype=np.float64)
    n = len(w)
    last = w[-period:]
    feats = {"lag1": float(w[n - period]) if period <= n else float("nan"),
             "lag2": float(w[n - 2 * period]) if 2 * period <= n else float("nan"),
             "mean": float(last.mean()), "min": float(last.min()), "max": float(last.max()), "xcorr": float("nan")}
    if 2 * period <= n:
        prev = w[-2 * period:-period]
        if last.std() > 0 and prev.std() > 0:
            feats["xcorr"] = float(np.corrcoef(last, prev)[0, 1])
    return feats


def primary_periods(periods: list[list[int]] | None, n_vars: int, frequency: str, seq_len: int,
                    fallback: bool) -> list[int | None]:
    """One period per variable: its strongest detected one (<= seq_len), else the frequency's
    natural period when ``fallback`` (the seasonal-naive residual needs one), else None."""
    out: list[int | None] = []
    for j in range(n_vars):
        cands = [p for p in (periods[j] if periods else []) if p <= seq_len]
        p = cands[0] if cands else (NATURAL_PERIOD.get(frequency) if fallback else None)
        out.append(p if p is None or p <= seq_len else None)
    return out


def seasonal_naive_rows(seq_len: int, pred_len: int, periods) -> np.ndarray:
    """Input rows the seasonal-naive forecast repeats: L - p + (h mod p) for each horizon step h;
    [pred_len] for one period, [pred_len, N] for one period per variable."""
    p = np.asarray(periods)
    h = np.arange(pred_len).reshape((-1,) + (1,) * p.ndim)
    return seq_len - p + h % p
