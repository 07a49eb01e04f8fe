"""Backtest metrics of rolling forecasts against the actuals that followed each cutoff (torch-free).

Per scored window (one whose whole horizon is in the input): MSE and MAE in original units and in
the paper's normalised units (errors divided by the training split's per-variable standard
deviation), sMAPE (percent, ``200 |y - f| / (|y| + |f|)``, 0 where both are 0) and MASE (absolute
error divided by the window's in-sample seasonal-naive MAE, ``mean |x_t - x_{t-m}|`` over its seq_len
rows, as M4 scales by the series' own history). The same for two naive forecasts on the same windows:
seasonal-naive (the window's last season repeated, ``m`` from the data frequency) and repeat-last.
With prediction intervals: the share of actuals inside each level's interval, and its mean width.
Reported overall, per variable and per horizon bucket (quarters of pred_len).
"""

from __future__ import annotations

import numpy as np

from timecma.core.seasonality import NATURAL_PERIOD, seasonal_naive_rows

FORECASTS = ("model", "seasonal_naive", "repeat_last")
STATS = ("se", "ae", "se_norm", "ae_norm", "smape", "ase")


def season_length(frequency: str, seq_len: int) -> int:
    """The seasonal-naive period: the frequency's natural one if a window holds it, else 1 (plain naive)."""
    m = NATURAL_PERIOD.get(frequency, 1)
    return m if m <= seq_len // 2 else 1


def horizon_buckets(pred_len: int) -> list[tuple[int, int]]:
    """1-based inclusive step ranges: quarters of the horizon (fewer for short ones)."""
    parts = np.array_split(np.arange(1, pred_len + 1), min(4, pred_len))
    return [(int(p[0]), int(p[-1])) for p in parts]


class BacktestMetrics:
    """Sums per (horizon step, variable) for the model and the naive forecasts; ``report`` averages them."""

    def __init__(self, variables: list[str], seq_len: int, pred_len: int, frequency: str, train_std,
                 levels: list[int] | None = None):
        self.variables, self.seq_len, self.pred_len = variables, seq_len, pred_len
        self.m = season_length(frequency, seq_len)
        self.train_std = np.asarray(train_std, dtype=np.float64)
        self.levels = list(levels or [])
        shape = (pred_len, len(variables))
        self.sums = {f: {s: np.zeros(shape) for s in STATS} for f in FORECASTS}
        self.inside = {lv: np.zeros(shape) for lv in self.levels}
        self.width = {lv: np.zeros(shape) for lv in self.levels}
        self.count = np.zeros(shape)  # windows scored (per cell: all the same)
        self.mase_count = np.zeros(shape)  # windows whose seasonal scale is non-zero
        self.windows = 0

    def add(self, x: np.ndarray, y: np.ndarray, y_hat: np.ndarray,
            intervals: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        """Windows ``x`` [W, L, N], actuals ``y`` and forecasts ``y_hat`` [W, H, N], original units."""
        x, y, y_hat = (np.asarray(a, dtype=np.float64) for a in (x, y, y_hat))
        scale = np.abs(x[:, self.m:] - x[:, :-self.m]).mean(axis=1)[:, None, :]  # [W, 1, N]
        has_scale = np.broadcast_to(scale > 0, y.shape)
        naive = {"seasonal_naive": x[:, seasonal_naive_rows(self.seq_len, self.pred_len, self.m)],
                 "repeat_last": np.broadcast_to(x[:, -1:], y.shape)}
        for name, f in (("model", y_hat), *naive.items()):
            e = y - f
            denom = np.abs(y) + np.abs(f)
            s = self.sums[name]
            s["se"] += (e ** 2).sum(0)
            s["ae"] += np.abs(e).sum(0)
            s["se_norm"] += ((e / self.train_std) ** 2).sum(0)
            s["ae_norm"] += np.abs(e / self.train_std).sum(0)
            s["smape"] += np.divide(200 * np.abs(e), denom, out=np.zeros_like(e), where=denom > 0).sum(0)
            s["ase"] += np.divide(np.abs(e), scale, out=np.zeros_like(e), where=has_scale).sum(0)
        for lv, (lo, hi) in (intervals or {}).items():
            self.inside[lv] += ((y >= lo) & (y <= hi)).sum(0)
            self.width[lv] += (hi - lo).sum(0)
        self.count += len(x)
        self.mase_count += has_scale.sum(0)
        self.windows += len(x)

    def _summary(self, name: str, cells: tuple) -> dict:
        s, n = self.sums[name], self.count[cells].sum()
        if n == 0:
            return {}
        mc = self.mase_count[cells].sum()
        return {"mse": float(s["se_norm"][cells].sum() / n), "mae": float(s["ae_norm"][cells].sum() / n),
                "mse_raw": float(s["se"][cells].sum() / n), "mae_raw": float(s["ae"][cells].sum() / n),
                "mase": float(s["ase"][cells].sum() / mc) if mc else None,
                "smape": float(s["smape"][cells].sum() / n)}

    def report(self, unscored: int = 0) -> dict:
        all_cells = (slice(None), slice(None))
        groups = {"overall": all_cells,
                  **{f"variable {v}": (slice(None), j) for j, v in enumerate(self.variables)},
                  **{f"steps {a}-{b}": (slice(a - 1, b), slice(None)) for a, b in horizon_buckets(self.pred_len)}}
        out: dict = {"windows": self.windows, "windows_without_full_horizon": unscored,
                     "season_length": self.m,
                     "units": {"mse, mae": "normalised by the training split's std per variable (the paper's)",
                               "mse_raw, mae_raw": "original units", "smape": "percent",
                               "mase": "vs the window's in-sample seasonal-naive MAE"}}
        for name in FORECASTS:
            out[name] = {g: self._summary(name, c) for g, c in groups.items()}
        if self.levels and self.windows:
            n = self.count.sum()
            out["intervals"] = {str(lv): {"coverage": float(self.inside[lv].sum() / n),
                                          "mean_width": float(self.width[lv].sum() / n),
                                          "per_variable": {v: float(self.inside[lv][:, j].sum() / self.count[:, j].sum())
                                                           for j, v in enumerate(self.variables)}}
                                for lv in self.levels}
        return out


def table(report: dict) -> str:
    """The overall and per-horizon lines, model beside the naive forecasts: what a terminal shows."""
    if not report["windows"]:
        return "no window had its whole horizon in the input: nothing to score"
    groups = [g for g in report["model"] if not g.startswith("variable")]
    lines = [f"backtest: {report['windows']} windows scored (seasonal-naive period {report['season_length']})",
             f"{'':14s} {'forecast':15s} {'MSE':>8s} {'MAE':>8s} {'MASE':>7s} {'sMAPE%':>7s}"]
    for g in groups:
        for name in FORECASTS:
            r = report[name][g]
            mase = f"{r['mase']:7.3f}" if r["mase"] is not None else f"{'-':>7s}"
            lines.append(f"{g if name == 'model' else '':14s} {name:15s} {r['mse']:8.4f} {r['mae']:8.4f} {mase} "
                         f"{r['smape']:7.2f}")
    for lv, c in (report.get("intervals") or {}).items():
        lines.append(f"{lv}% interval: covers {c['coverage']:.1%} of actuals, mean width {c['mean_width']:.3g}")
    return "\n".join(lines)
