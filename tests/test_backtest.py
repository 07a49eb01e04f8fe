"""What forecasting practitioners expect: backtest metrics (against a hand computation), split-conformal
intervals (coverage on held-back ETTh1), long format in and out (round trip, refusals naming the row, no
output left), and the plot."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ETTH1, make_frame, run_cli

from timecma.core.conformal import Calibration, parse_levels
from timecma.core.errors import InputError
from timecma.runtime import Forecaster
from timecma.runtime.serving.backtest import BacktestMetrics
from timecma.runtime.serving.long_format import LongFormat, long_to_wide

VARS = ["v0", "v1", "v2"]
SERVE = "timecma.runtime.serving.batch_cli:serve_batch_cmd"


def test_metrics_match_a_hand_computation():
    rng = np.random.default_rng(0)
    L, H, N, W = 8, 3, 2, 5
    x = rng.normal(10, 2, (W, L, N))
    y = rng.normal(10, 2, (W, H, N))
    f = y + rng.normal(0, 1, (W, H, N))
    std = np.array([2.0, 4.0])
    m = BacktestMetrics(["a", "b"], L, H, "daily", std)  # season 7 > L // 2: plain naive (m = 1)
    m.add(x[:2], y[:2], f[:2])
    m.add(x[2:], y[2:], f[2:])  # accumulating in parts = at once
    r = m.report()
    assert m.m == 1 and r["windows"] == W
    e = y - f
    want = {"mse": ((e / std) ** 2).mean(), "mae": np.abs(e / std).mean(), "mse_raw": (e ** 2).mean(),
            "mae_raw": np.abs(e).mean(), "smape": (200 * np.abs(e) / (np.abs(y) + np.abs(f))).mean(),
            "mase": (np.abs(e) / np.abs(np.diff(x, axis=1)).mean(axis=1)[:, None, :]).mean()}
    for k, v in want.items():
        assert r["model"]["overall"][k] == pytest.approx(v, rel=1e-12), k
    # per variable and per horizon bucket; the naive baselines on the same windows
    assert r["model"]["variable b"]["mae_raw"] == pytest.approx(np.abs(e[..., 1]).mean(), rel=1e-12)
    assert r["model"]["steps 2-2"]["mse_raw"] == pytest.approx((e[:, 1] ** 2).mean(), rel=1e-12)
    last = y - x[:, -1:, :]
    assert r["repeat_last"]["overall"]["mae_raw"] == pytest.approx(np.abs(last).mean(), rel=1e-12)
    assert r["seasonal_naive"]["overall"]["mae_raw"] == pytest.approx(np.abs(last).mean(), rel=1e-12)  # m = 1


def test_conformal_rank_and_scaling():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (99, 16, 2)) * np.array([1.0, 10.0])  # the second variable ten times as volatile
    y_hat = np.zeros((99, 4, 2))
    y = rng.normal(0, 1, (99, 4, 2)) * np.array([1.0, 10.0])
    cal = Calibration.fit(x, y, y_hat)
    # 99 scores: the 80% quantile is the ceil(100 * 0.8) = 80th smallest
    spread = np.maximum(x.std(axis=1), np.percentile(x.std(axis=1), 1, axis=0))  # floored at the 1st percentile
    scores = np.abs(y) / spread[:, None, :]
    assert cal.quantiles[79] == pytest.approx(np.sort(scores, axis=0)[79])
    h = cal.half_width(x[:1], 80)
    assert h[0, 0, 1] / h[0, 0, 0] == pytest.approx(cal.quantiles[79, 0, 1] / cal.quantiles[79, 0, 0]
                                                     * x[0, :, 1].std() / x[0, :, 0].std())
    assert parse_levels("95,80,80") == [80, 95]
    for bad in ("0", "100", "x"):
        with pytest.raises(InputError):
            parse_levels(bad)


@pytest.fixture(scope="module")
def frame():
    return make_frame(200, seed=9)


def test_rolling_backtest_writes_cutoff_intervals_and_metrics(small_bundle, frame, tmp_path):
    inp, out, met = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "metrics.json"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), inp)
    r = run_cli(SERVE, str(inp), "--bundle", str(small_bundle), "--out", str(out), "--mode", "rolling",
                "--stride", "10", "--levels", "80,95", "--metrics", str(met), "--quiet", "--backend", "ort-cpu")
    assert r.returncode == 0, r.stderr
    assert "seasonal_naive" in r.stdout and "80% interval" in r.stdout
    fc = pq.read_table(out).to_pandas()
    assert {"cutoff", "v0-lo-80", "v0-hi-80", "v2-lo-95", "v2-hi-95"} <= set(fc.columns)
    assert (fc["v0-lo-95"] <= fc["v0-lo-80"]).all() and (fc["v0-lo-80"] <= fc["v0"]).all()
    assert (fc["v0"] <= fc["v0-hi-80"]).all() and (fc["v0-hi-80"] <= fc["v0-hi-95"]).all()
    rep = json.loads(met.read_text())
    # the hand computation from the written forecasts and the input's actuals
    joined = fc.merge(frame, on="date", suffixes=("", "_true"))
    full = joined.groupby("cutoff").filter(lambda g: len(g) == 12)  # windows whose horizon is in the input
    e = np.stack([full[v] - full[f"{v}_true"] for v in VARS], axis=1)
    assert rep["windows"] == full.cutoff.nunique() and rep["windows_without_full_horizon"] == fc.cutoff.nunique() - \
        rep["windows"]
    assert rep["model"]["overall"]["mae_raw"] == pytest.approx(np.abs(e).mean(), rel=1e-5)
    inside = np.stack([(full[f"{v}_true"] >= full[f"{v}-lo-80"]) & (full[f"{v}_true"] <= full[f"{v}-hi-80"])
                       for v in VARS], axis=1)
    assert rep["intervals"]["80"]["coverage"] == pytest.approx(inside.mean(), abs=1e-9)
    # the same in Python
    with Forecaster.load(str(small_bundle), backend="ort-cpu") as f:
        df, rep2 = f.backtest(frame, stride=10, levels=[80, 95])
        both = f.predict(frame.iloc[:24], levels=[80])
    assert rep2["model"]["overall"]["mae_raw"] == pytest.approx(rep["model"]["overall"]["mae_raw"], rel=1e-6)
    np.testing.assert_allclose(df[VARS].to_numpy(), fc[VARS].to_numpy(), rtol=1e-6, atol=1e-6)
    assert set(both) == {"forecast", "lo-80", "hi-80"} and (both["lo-80"] <= both["forecast"]).all()


def test_metrics_need_rolling_mode(small_bundle, frame, tmp_path):
    inp, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), inp)
    r = run_cli(SERVE, str(inp), "--bundle", str(small_bundle), "--out", str(out), "--metrics", str(tmp_path / "m"))
    assert r.returncode != 0 and "--mode rolling" in r.stderr and not out.exists()


def _long(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.melt(id_vars="date", var_name="unique_id", value_name="y").rename(columns={"date": "ds"})


def test_long_format_round_trip_equals_wide(small_bundle, frame, tmp_path):
    two = pd.concat([frame.assign(store="a"), frame.assign(store="b", v0=frame.v0 + 1.0)])
    wide_in, long_in = tmp_path / "wide.parquet", tmp_path / "long.parquet"
    pq.write_table(pa.Table.from_pandas(two, preserve_index=False), wide_in)
    lng = pd.concat([_long(frame).assign(store="a"), _long(frame.assign(v0=frame.v0 + 1.0)).assign(store="b")])
    pq.write_table(pa.Table.from_pandas(lng.sample(frac=1.0, random_state=0), preserve_index=False), long_in)
    outs = {}
    for name, inp, extra in (("wide", wide_in, []), ("long", long_in, ["--format", "long"])):
        outs[name] = tmp_path / f"{name}.out.parquet"
        r = run_cli(SERVE, str(inp), "--bundle", str(small_bundle), "--out", str(outs[name]), "--series-col", "store",
                    "--mode", "rolling", "--stride", "24", "--levels", "80", "--quiet", "--backend", "ort-cpu", *extra)
        assert r.returncode == 0, r.stderr
    wide = pq.read_table(outs["wide"]).to_pandas()
    lo = pq.read_table(outs["long"]).to_pandas()
    assert list(lo.columns) == ["store", "unique_id", "ds", "cutoff", "y_hat", "y_hat-lo-80", "y_hat-hi-80"]
    back = lo.pivot_table(index=["store", "cutoff", "ds"], columns="unique_id", values=["y_hat", "y_hat-lo-80"])
    w = wide.set_index(["store", "cutoff", "date"]).sort_index()
    np.testing.assert_array_equal(back["y_hat"][VARS].to_numpy(), w[VARS].to_numpy())
    np.testing.assert_array_equal(back["y_hat-lo-80"][VARS].to_numpy(), w[[f"{v}-lo-80" for v in VARS]].to_numpy())
    # and the pivot itself: long -> wide gives the frame back
    t = long_to_wide(pa.Table.from_pandas(_long(frame), preserve_index=False), LongFormat(), VARS, "date")
    np.testing.assert_array_equal(t.to_pandas()[VARS].to_numpy(), frame[VARS].to_numpy())


@pytest.mark.parametrize("break_it, message", [
    (lambda d: d[d.unique_id != "v2"], "no rows for unique_id(s) ['v2']"),
    (lambda d: pd.concat([d, d.iloc[[5]].assign(unique_id="v9")]), "row 600: unique_id 'v9' is not one of"),
    (lambda d: pd.concat([d, d.iloc[[7]]]), "row 600 duplicates (unique_id, ds)"),
    (lambda d: d.drop(index=d.index[(d.unique_id == "v1") & (d.ds == d.ds.iloc[50])]), "ragged timestamps"),
])
def test_long_format_refusals_name_the_row_and_write_nothing(small_bundle, tmp_path, break_it, message):
    d = _long(make_frame(200, seed=9)).reset_index(drop=True)
    inp, out = tmp_path / "long.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.Table.from_pandas(break_it(d), preserve_index=False), inp)
    r = run_cli(SERVE, str(inp), "--bundle", str(small_bundle), "--out", str(out), "--format", "long", "--quiet")
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.parquet.tmp-*"))


def test_plot_draws_a_png(small_bundle, frame, tmp_path):
    pytest.importorskip("matplotlib", reason="timecma-plot needs matplotlib (timecma[plot])")
    inp, out, png = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "plot.png"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), inp)
    r = run_cli(SERVE, str(inp), "--bundle", str(small_bundle), "--out", str(out), "--mode", "rolling", "--stride",
                "24", "--levels", "80,95", "--quiet", "--backend", "ort-cpu")
    assert r.returncode == 0, r.stderr
    plot = "timecma.runtime.serving.plot:plot_cmd"
    r = run_cli(plot, str(out), "--data", str(inp), "--out", str(png), "--variables", "v0,v2", "--cutoffs", "2")
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_cli(plot, str(out), "--data", str(inp), "--out", str(tmp_path / "no.png"), "--variables", "v7")
    assert r.returncode != 0 and "v7" in r.stderr and not (tmp_path / "no.png").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_interval_coverage_on_held_back_etth1(tmp_path):
    """Calibrated on ETTh1's validation split, judged on its test split (never seen): coverage within a few points
    of nominal. A DLinear forecaster, so the test takes seconds; the intervals wrap any model the same way."""
    out = tmp_path / "run"
    r = run_cli("timecma.cli:train_cmd", "--data", str(ETTH1), "--model", "dlinear", "--out", str(out),
                "--seq-len", "96", "--pred-len", "24", "--epochs", "3", "--train-stride", "4", "--eval-stride", "4",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    iv = json.loads((out / "metrics.json").read_text())["intervals"]
    cov = {lv: c["coverage"] for lv, c in iv["test"].items()}
    print(f"\nETTh1 test coverage: {cov}")
    assert abs(cov["80"] - 0.80) < 0.06 and abs(cov["95"] - 0.95) < 0.04, cov
