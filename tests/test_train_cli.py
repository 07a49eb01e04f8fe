"""timecma-train end to end on a small series, and its refusals."""

import json

import pytest
import torch

from timecma.checkpoint import load_checkpoint

from conftest import TRAIN_ARGS as ARGS
from conftest import run_cli


def run_train(*args: str):
    return run_cli("timecma.cli:train_cmd", *args)


@pytest.fixture(scope="module")
def trained(small_run):
    return small_run


def test_train_writes_checkpoint_metrics_and_store(trained, tiny_llm_dir):
    data, out = trained
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["format_version"] == 1
    assert ckpt["data"]["variables"] == ["v0", "v1", "v2"] and ckpt["data"]["frequency"] == "hourly"
    assert ckpt["data"]["split"] == "ratio" and len(ckpt["data"]["scaler_mean"]) == 3
    assert ckpt["prompt"]["name"] == "reference" and len(ckpt["prompt"]["hash"]) == 64
    assert ckpt["llm"]["id"] == tiny_llm_dir and ckpt["llm"]["d_llm"] == 32
    assert ckpt["model_config"]["num_nodes"] == 3 and ckpt["model_config"]["seq_len"] == 24
    assert set(ckpt["metrics"]["test"]) == {"mse", "mae"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["naive"]["test"]) == {"repeat_last", "window_mean", "seasonal_naive"}
    assert metrics["val"]["mse"] > 0 and metrics["embeddings_computed"] > 0
    assert (out / "store" / "data.mdb").exists()


def test_rerun_reuses_store_and_is_reproducible(trained, tiny_llm_dir, tmp_path):
    data, out = trained
    out2 = tmp_path / "run2"
    r = run_train("--data", str(data), "--llm", tiny_llm_dir, "--out", str(out2), "--store", str(out / "store"), *ARGS)
    assert r.returncode == 0, r.stderr
    m1 = json.loads((out / "metrics.json").read_text())
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["embeddings_computed"] == 0  # everything came from the store
    assert m2["test"] == pytest.approx(m1["test"], rel=1e-6)
    sd1, sd2 = load_checkpoint(out / "best.pt")["state_dict"], load_checkpoint(out2 / "best.pt")["state_dict"]
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_store_from_another_llm_is_refused_and_nothing_damaged(trained, other_llm_dir):
    data, out = trained
    before_ckpt = (out / "best.pt").read_bytes()
    before_store = (out / "store" / "data.mdb").read_bytes()
    r = run_train("--data", str(data), "--llm", other_llm_dir, "--out", str(out), *ARGS)
    assert r.returncode != 0
    assert "built by another LLM" in r.stderr and "Use a different store directory" in r.stderr
    assert (out / "best.pt").read_bytes() == before_ckpt
    assert (out / "store" / "data.mdb").read_bytes() == before_store


def test_bad_inputs_exit_nonzero_with_message(tmp_path, tiny_llm_dir, small_csv):
    r = run_train("--data", str(tmp_path / "missing.csv"), "--llm", tiny_llm_dir, "--out", str(tmp_path / "o"), *ARGS)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_train("--data", small_csv, "--llm", tiny_llm_dir, "--out", str(tmp_path / "o"), *ARGS, "--seq-len", "400")
    assert r.returncode == 2 and "fewer than one window" in r.stderr
    r = run_train("--data", small_csv, "--llm", str(tmp_path / "no-llm"), "--out", str(tmp_path / "o"), *ARGS)
    assert r.returncode == 2 and "cannot load LLM" in r.stderr
    assert not (tmp_path / "o" / "best.pt").exists()


def test_float16_store_trains_and_serves(small_run, tiny_llm_dir, tmp_path):
    import numpy as np

    from conftest import make_frame
    from timecma.runtime import Forecaster

    data, _ = small_run
    out = tmp_path / "run"
    r = run_cli("timecma.cli:train_cmd", "--data", str(data), "--llm", tiny_llm_dir, "--out", str(out),
                "--store-dtype", "float16", *ARGS)
    assert r.returncode == 0, r.stderr
    r = run_cli("timecma.export.cli:export_cmd", "--ckpt", str(out / "best.pt"), "--parity-windows", "2",
                "--tensorrt", "skip")
    assert r.returncode == 0, r.stderr
    window = make_frame().iloc[100:124]  # a training window: its prompts are in the float16 store
    f = Forecaster.load(str(out / "bundle"), backend="ort-cpu", store=str(out / "store"))
    y = f.predict(window)
    assert f.store.dtype == np.float16 and f.stats.hits == 3 and f.stats.llm_calls == 0
    fresh = Forecaster.load(str(out / "bundle"), backend="ort-cpu").predict(window)  # fp32 LLM output, no store
    assert (np.abs(y - fresh) / make_frame()[["v0", "v1", "v2"]].to_numpy().std(axis=0)).max() < 1e-2
