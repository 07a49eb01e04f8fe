"""Spike-aware log scaling: exact round trip, refusals, the same formulas in the exported graph,
and a new all-time low at serving clamped and counted instead of turning into NaN."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TRAIN_ARGS, make_frame, run_cli
from timecma.core.errors import InputError
from timecma.core.scaling import CLIP, FLOOR, Scaler


@settings(max_examples=50, deadline=None)
@given(scale=st.sampled_from([1e-3, 1.0, 1e3, 1e6]), shift=st.floats(-1e3, 1e3), seed=st.integers(0, 10_000))
def test_log_round_trip_is_exact_inside_the_clip_range(scale, shift, seed):
    rng = np.random.default_rng(seed)
    train = rng.lognormal(0, 2, size=(500, 3)) * scale + shift  # heavy right tail: spikes
    sc = Scaler.fit(train, ["a", "b", "c"], "log")
    np.testing.assert_allclose(train.min(axis=0) + sc.offset, 1.0, rtol=1e-9)  # the training minimum maps to 1
    z = sc.transform(train)
    inside = np.abs(z) < CLIP
    back = sc.inverse(z)
    rel = np.abs(back - train) / np.maximum(np.abs(train), np.abs(sc.offset))
    assert rel[inside].max() <= 1e-6


def test_log_scaler_refuses_bad_parameters():
    good = np.arange(30, dtype=float).reshape(10, 3)
    with pytest.raises(InputError, match=r"constant column\(s\) \['b'\]"):
        Scaler.fit(np.c_[good[:, 0], np.full(10, 4.0), good[:, 2]], ["a", "b", "c"], "log")
    bad = good.copy()
    bad[3, 1] = -np.inf
    with pytest.raises(InputError, match=r"non-finite offset for column\(s\) \['b'\]"):
        Scaler.fit(bad, ["a", "b", "c"], "log")
    with pytest.raises(InputError, match="unknown scaler 'minmax'"):
        Scaler.fit(good, ["a", "b", "c"], "minmax")


def test_forecaster_graph_applies_the_same_formulas():
    """The graph's scaling (torch, exported) equals core.scaling's (numpy), floor clamp included."""
    from timecma.export.onnx_export import ForecasterGraph

    class LastSteps(torch.nn.Module):  # a model whose output is part of its input: the scaling is all there is
        def forward(self, x, prompt_emb=None):
            return x[:, -4:] * 1.5

    rng = np.random.default_rng(0)
    train = rng.lognormal(0, 1, size=(400, 2)) * 100 - 50
    sc = Scaler.fit(train, ["a", "b"], "log")
    x = train[None, :12].copy()
    x[0, 3, 1] = train[:, 1].min() - 10 * sc.offset[1] - 5  # far below the floor
    graph = ForecasterGraph(LastSteps(), sc).eval()
    with torch.no_grad():
        got = graph(torch.from_numpy(x.astype(np.float32))).numpy()
    expected = sc.inverse(np.clip(sc.transform(x)[:, -4:] * 1.5, -CLIP, CLIP))
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-3)
    assert np.isfinite(got).all() and sc.below_floor(x).tolist() == [1]
    assert x[0, 3, 1] + sc.offset[1] <= FLOOR


@pytest.fixture(scope="module")
def log_run(small_run, tmp_path_factory):
    data, _ = small_run
    out = tmp_path_factory.mktemp("log") / "run"
    r = run_cli("timecma.cli:train_cmd", "--data", str(data), "--out", str(out), "--scaler", "log",
                "--model", "timecma-no-llm", *TRAIN_ARGS)
    assert r.returncode == 0, r.stderr
    r = run_cli("timecma.export.cli:export_cmd", "--ckpt", str(out / "best.pt"), "--parity-windows", "3")
    assert r.returncode == 0, r.stderr  # export refuses parity beyond 1e-4: the log graph matches PyTorch
    return data, out


def test_log_scaler_goes_into_checkpoint_manifest_and_metrics(log_run):
    import json

    from timecma.checkpoint import load_checkpoint
    from timecma.core.manifest import read_manifest

    _, run = log_run
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["data"]["scaler_kind"] == "log" and len(ckpt["data"]["scaler_offset"]) == 3
    m = read_manifest(run / "bundle")
    assert m.data.scaler_kind == "log" and m.data.scaler_offset == ckpt["data"]["scaler_offset"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["scaler"] == "log" and 0 < metrics["test"]["mse"] < 10  # reported in standard-normalised units
    par = m.graphs["forecaster"].info["parity_vs_torch"]["ort_cpu_fp32"]
    assert max(v["max_abs"] for v in par.values()) <= 1e-4


def test_new_all_time_low_is_clamped_counted_and_reported(log_run, tmp_path):
    from timecma.runtime import Forecaster

    _, run = log_run
    frame = make_frame(60, seed=4)
    offset = np.array(Forecaster.load(str(run / "bundle"), backend="ort-cpu").scaler.offset)
    frame.loc[30, "v1"] = -offset[1] - 1000.0  # below the floor: log of a negative number otherwise
    f = Forecaster.load(str(run / "bundle"), backend="ort-cpu")
    y = f.predict(frame.iloc[10:34])
    assert np.isfinite(y).all() and f.stats.clamped == 1
    eager = Forecaster.load(str(run / "bundle"), backend="torch").predict(frame.iloc[10:34])
    np.testing.assert_allclose(y, eager, rtol=1e-4, atol=1e-3)
    inp, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), inp)
    r = run_cli("timecma.runtime.serving.batch_cli:serve_batch_cmd", str(inp), "--bundle", str(run / "bundle"),
                "--out", str(out), "--mode", "rolling", "--stride", "6")
    assert r.returncode == 0, r.stderr
    table = pq.read_table(out).to_pandas()
    windows = table.drop_duplicates("cutoff")
    assert (windows["clamped_inputs"] > 0).sum() >= 1 and np.isfinite(table[["v0", "v1", "v2"]].to_numpy()).all()
    assert "clamped at the log scaler's floor" in r.stdout and "were clamped" in r.stderr


def test_spiky_log_model_with_a_llama_llm_exports(tmp_path):
    """Values spiking to 30x the series maximum, --scaler log --template lags --residual seasonal-naive and a
    Llama-style LLM: the exponential inverse amplifies float32 rounding in raw units, so forecaster parity is
    judged where the model computes (log space); a valid model exports, at the same 1e-4 tolerance."""
    from timecma.core.manifest import read_manifest
    from timecma.llm import build_tiny_llm

    llm = build_tiny_llm(tmp_path / "llama", arch="llama")
    frame = make_frame(500, seed=3)
    rng = np.random.default_rng(3)
    for col in ("v0", "v1", "v2"):
        rows = rng.choice(len(frame), 12, replace=False)
        frame.loc[rows, col] = 30 * frame[col].abs().max()
    data = tmp_path / "spiky.csv"
    frame.to_csv(data, index=False)
    out = tmp_path / "run"
    r = run_cli("timecma.cli:train_cmd", "--data", str(data), "--llm", llm, "--out", str(out), "--scaler", "log",
                "--template", "lags", "--residual", "seasonal-naive", *TRAIN_ARGS, "--epochs", "1")
    assert r.returncode == 0, r.stderr
    r = run_cli("timecma.export.cli:export_cmd", "--ckpt", str(out / "best.pt"), "--parity-windows", "4",
                "--tensorrt", "skip", "--openvino", "skip")
    assert r.returncode == 0, r.stderr
    par = read_manifest(out / "bundle").graphs["forecaster"].info["parity_vs_torch"]
    assert par["units"] == "log-normalized" and max(v["max_abs"] for v in par["ort_cpu_fp32"].values()) <= 1e-4
