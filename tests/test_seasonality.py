"""Detected seasonality, lag features, the `lags` prompt template and the seasonal-naive residual,
computed one way (timecma.core.seasonality) in training, export and serving."""

import numpy as np
import torch

from conftest import TRAIN_ARGS, make_frame, run_cli
from timecma.core.config import ModelConfig
from timecma.core.prompts import PromptRenderer, get_template
from timecma.core.seasonality import detect_periods, lag_features, primary_periods
from timecma.model import DLinear


def test_periods_detected_where_they_are_and_not_where_they_are_not():
    rng = np.random.default_rng(0)
    t = np.arange(24 * 7 * 12)
    daily = np.sin(2 * np.pi * t / 24) + 0.2 * rng.normal(size=t.size)
    two = np.sin(2 * np.pi * t / 24) + 1.5 * np.sin(2 * np.pi * t / 168) + 0.2 * rng.normal(size=t.size)
    noise = rng.normal(size=t.size)
    trend = 0.01 * t + daily  # a linear trend does not hide the period
    got = detect_periods(np.c_[daily, two, noise, trend], max_period=200)
    assert got[0][0] == 24 and got[3][0] == 24
    assert set(got[1]) == {24, 168}
    assert got[2] == []
    assert primary_periods(got, 4, "hourly", 96, fallback=False) == [24, 24, None, 24]
    assert primary_periods(got, 4, "hourly", 96, fallback=True)[2] == 24  # the natural period stands in


def test_lag_features():
    w = np.arange(48, dtype=float)
    f = lag_features(w, 12)
    assert f["lag1"] == 36 and f["lag2"] == 24 and f["min"] == 36 and f["max"] == 47
    assert f["mean"] == np.mean(np.arange(36, 48)) and abs(f["xcorr"] - 1.0) < 1e-12
    assert np.isnan(lag_features(w, 30)["lag2"]) and np.isnan(lag_features(w, 30)["xcorr"])


def test_lags_template_adds_period_features_and_reference_is_unchanged():
    frame = make_frame(60)
    raw, ts = frame[["v0", "v1", "v2"]].to_numpy(), frame["date"].to_numpy()
    ref = PromptRenderer(get_template("reference"), "hourly").render_series(raw, ts, [0], 48)
    lags = PromptRenderer(get_template("lags"), "hourly", [24, None, 12]).render_series(raw, ts, [0], 48)
    for r, g in zip(ref, lags):
        assert g.startswith(r + ". ")  # the reference prompt, then the lag sentence
    assert f"The period was 24 steps; one period back the value was {int(raw[24, 0])}," in lags[0]
    assert lags[1].endswith("No seasonal period was detected")
    assert f"two periods back {int(raw[24, 2])};" in lags[2]


def test_seasonal_naive_residual_is_inside_the_model():
    cfg = ModelConfig(num_nodes=2, seq_len=48, pred_len=30, model="dlinear", residual="seasonal-naive",
                      residual_periods=[24, 7])
    m = DLinear(cfg).eval()
    for p in m.parameters():
        torch.nn.init.zeros_(p)  # the network adds nothing: the output is the seasonal-naive forecast
    x = torch.randn(3, 48, 2)
    with torch.no_grad():
        y = m(x)
    h = np.arange(30)
    np.testing.assert_array_equal(y[:, :, 0].numpy(), x[:, 48 - 24 + h % 24, 0].numpy())
    np.testing.assert_array_equal(y[:, :, 1].numpy(), x[:, 48 - 7 + h % 7, 1].numpy())
    assert set(m.state_dict()) == {"linear_seasonal.weight", "linear_seasonal.bias", "linear_trend.weight",
                                   "linear_trend.bias"}  # the index is not a weight


def test_lags_template_and_residual_train_export_and_serve(small_run, tiny_llm_dir, tmp_path):
    """Training and serving render the same `lags` prompts (served training windows are store hits),
    and the residual model exports with unchanged graph inputs and parity."""
    from timecma.checkpoint import load_checkpoint
    from timecma.core.manifest import read_manifest
    from timecma.runtime import Forecaster

    data, _ = small_run
    out = tmp_path / "run"
    r = run_cli("timecma.cli:train_cmd", "--data", str(data), "--llm", tiny_llm_dir, "--out", str(out),
                "--template", "lags", "--residual", "seasonal-naive", *TRAIN_ARGS)
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(out / "best.pt")
    frame = make_frame()
    train_rows = frame[["v0", "v1", "v2"]].to_numpy()[:int(0.7 * 500)]
    assert ckpt["data"]["periods"] == detect_periods(train_rows, max_period=24)  # from training rows only
    assert ckpt["prompt"]["name"] == "lags" and len(ckpt["prompt"]["periods"]) == 3
    assert ckpt["model_config"]["residual"] == "seasonal-naive"
    r = run_cli("timecma.export.cli:export_cmd", "--ckpt", str(out / "best.pt"), "--parity-windows", "3")
    assert r.returncode == 0, r.stderr
    m = read_manifest(out / "bundle")
    assert set(m.graphs["forecaster"].inputs) == {"x", "prompt_emb"} and m.prompt["periods"] == ckpt["prompt"]["periods"]
    f = Forecaster.load(str(out / "bundle"), backend="ort-cpu", store=str(out / "store"))
    window = frame.iloc[100:124]  # a training window: its prompts were embedded during training
    y = f.predict(window)
    assert f.stats.hits == 3 and f.stats.misses == 0
    eager = Forecaster.load(str(out / "bundle"), backend="torch").predict(window)
    assert (np.abs(y - eager) / train_rows.std(axis=0)).max() <= 1e-4
