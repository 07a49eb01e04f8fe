"""timecma.runtime: torch-free serving, store behaviour, end-to-end parity, timecma-serve-batch."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ETTH1, REPO, assert_float32_close, bundle_with_manifest_version, make_frame, run_cli
from timecma.core.errors import BundleError
from timecma.runtime import Forecaster, InputError

SERVE = "timecma.runtime.serving.batch_cli:serve_batch_cmd"
SEQ, PRED = 24, 12  # the small bundle's window (conftest TRAIN_ARGS)


def _write(df: pd.DataFrame, path) -> str:
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=100)
    return str(path)


def _no_leftovers(directory) -> bool:
    return not [p for p in os.listdir(directory) if ".tmp-" in p]


def test_runtime_serves_with_torch_import_blocked(small_bundle, tmp_path):
    """The whole serve path in a process where importing torch, transformers or pandas fails."""
    inp = _write(make_frame(200, seed=5), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    code = ("import sys\n"
            "class Block:  # as if not installed: importing raises ModuleNotFoundError\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers', 'pandas'):\n"
            "            raise ModuleNotFoundError(f'blocked: {name}')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from timecma.runtime.serving.batch_cli import serve_batch_cmd\n"
            "serve_batch_cmd()")
    r = subprocess.run([sys.executable, "-c", code, inp, "--bundle", str(small_bundle), "--out", str(out),
                        "--store", str(tmp_path / "store"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # auto's CPU choice (openvino where installed, else ort-cpu): either way without torch
    from timecma.runtime import available_backends

    expected = "openvino" if available_backends()["openvino"] == "available" else "ort-cpu"
    assert "store hits 0 / misses 3" in r.stdout and f"backend {expected}" in r.stdout
    assert pq.read_table(out).num_rows == PRED


def test_store_written_by_token_ids_only_is_hit_and_indexed(small_bundle, tiny_llm_dir, tmp_path):
    """A store filled without prompt texts (an older writer) still serves hits by token ids,
    and the first such hit adds the texts, so the next one skips tokenization."""
    from timecma.llm import encode_last_token, load_llm
    from timecma.core.manifest import read_manifest
    from timecma.core.store import EmbeddingStore
    from timecma.core.tokens import encode_prompts

    df = make_frame(SEQ, seed=11)
    m = read_manifest(str(small_bundle))
    f = Forecaster.load(str(small_bundle), backend="ort-cpu")
    prompts = f.renderer.render_series(df[f.variables].to_numpy(), df["date"].to_numpy(), [0], SEQ)
    llm = load_llm(tiny_llm_dir)  # the bundle records the LLM's folder name and digests, not this path
    assert llm.info.namespace == m.llm.namespace
    ids = encode_prompts(f.tokenizer, prompts)
    with EmbeddingStore(tmp_path / "store", m.llm.namespace, m.llm.d_llm) as st:
        st.put_many(st.keys(ids), encode_last_token(llm, ids))
    g = Forecaster.load(str(small_bundle), backend="ort-cpu", store=str(tmp_path / "store"))
    y = g.predict(df)
    assert g.stats.llm_calls == 0 and g.stats.hits == 3 and g.stats.seconds["tokenize"] > 0
    tokenize_s = g.stats.seconds["tokenize"]
    np.testing.assert_allclose(g.predict(df), y, rtol=0, atol=0)
    assert g.stats.seconds["tokenize"] == tokenize_s and g.stats.hits == 6
    assert_float32_close(y, f.predict(df))
    g.close()


def test_second_request_runs_no_llm_and_store_changes_nothing(small_bundle, tmp_path):
    df = make_frame(SEQ, seed=7)
    with_store = Forecaster.load(str(small_bundle), backend="ort-cpu", store=str(tmp_path / "store"))
    y1 = with_store.predict(df)
    calls, tokenize_s = with_store.stats.llm_calls, with_store.stats.seconds["tokenize"]
    assert calls == 1 and with_store.stats.misses == 3 and tokenize_s > 0
    y2 = with_store.predict(df[["v2", "date", "v0", "v1"]])  # columns matched by name, not order
    assert with_store.stats.llm_calls == calls, "a stored window ran the LLM again"
    assert with_store.stats.hits == 3
    assert with_store.stats.seconds["tokenize"] == tokenize_s, "a store hit tokenized (the text index missed)"
    without = Forecaster.load(str(small_bundle), backend="ort-cpu")
    y3 = without.predict(df["v0 v1 v2".split()].to_numpy(), df["date"].to_numpy())
    assert y1.shape == (PRED, 3)
    np.testing.assert_array_equal(y1, y2)
    assert_float32_close(y1, y3)  # split graphs vs the whole one
    with_store.close()


def test_a_window_served_again_runs_the_head_alone(small_bundle, tmp_path):
    """Batch-1 with a store: the window's encoded prompts are stored, and serving it again (in another process
    too) renders no prompt, reads no prompt vector and runs no prompt encoder, with the same forecast. The
    same values at other timestamps are another window."""
    df = make_frame(SEQ + 1, seed=21)
    win, later = df.iloc[:SEQ], df.iloc[:SEQ].assign(date=df["date"].iloc[1:].to_numpy())
    f = Forecaster.load(str(small_bundle), backend="ort-cpu", store=str(tmp_path / "store"))
    assert f.backend.split
    y1 = f.predict(win)
    render_s = f.stats.seconds["render"]
    assert f.stats.window_hits == 0 and f.stats.misses == 3
    np.testing.assert_array_equal(f.predict(win), y1)
    assert f.stats.window_hits == 1 and f.stats.hits == 3 and f.stats.seconds["render"] == render_s
    f.predict(later)
    assert f.stats.window_hits == 1 and f.stats.llm_calls == 2
    f.close()
    g = Forecaster.load(str(small_bundle), backend="ort-cpu", store=str(tmp_path / "store"))
    np.testing.assert_array_equal(g.predict(win), y1)
    assert g.stats.window_hits == 1 and g.stats.llm_calls == 0
    g.close()
    whole = Forecaster.load(str(small_bundle), backend="ort-cpu")  # no store: the whole forecaster graph
    assert whole._window_salt is None
    assert_float32_close(whole.predict(win), y1)


@pytest.mark.parametrize("bad, message", [
    (lambda d: d.drop(columns="v1"), "lacks variable column(s) ['v1']"),
    (lambda d: d.assign(extra=1.0), "unexpected column(s) ['extra']"),
    (lambda d: d.assign(v2=d.v2.where(d.index != 5)), "non-finite value in column 'v2' at row 5"),
    (lambda d: d.iloc[[0, 2, 1] + list(range(3, len(d)))], "not sorted"),
    (lambda d: d.assign(date=d.date.where(d.index != 4, d.date[3])), "duplicate timestamp"),
    (lambda d: d.assign(date=pd.date_range("2020-01-01", periods=len(d), freq="30min")), "frequency (hourly)"),
    (lambda d: d.iloc[:10], "window must be [24, 3] (seq_len x variables), got [10, 3]"),
])
def test_predict_refuses_bad_windows(small_bundle, bad, message):
    f = Forecaster.load(str(small_bundle), backend="ort-cpu")
    with pytest.raises(InputError) as exc:
        f.predict(bad(make_frame(SEQ, seed=1)))
    assert message in str(exc.value)


def test_newer_manifest_is_refused(small_bundle, tmp_path):
    copy = bundle_with_manifest_version(small_bundle, tmp_path / "bundle", 99)
    with pytest.raises(BundleError, match="upgrade timecma"):
        Forecaster.load(str(copy))
    r = run_cli(SERVE, _write(make_frame(50), tmp_path / "in.parquet"), "--bundle", str(copy))
    assert r.returncode == 3 and "manifest version 99" in r.stderr  # the bundle is wrong: exit 3


def test_serve_batch_series_and_rolling_match_predict(small_bundle, tmp_path):
    a, b = make_frame(60, seed=1), make_frame(40, seed=2)
    a["id"], b["id"] = "a", "b"
    both = pd.concat([a, b]).sample(frac=1.0, random_state=0).sort_values("date", kind="stable")  # interleaved
    inp = _write(both[["id", "v2", "date", "v0", "v1"]], tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    r = run_cli(SERVE, inp, "--bundle", str(small_bundle), "--out", str(out), "--series-col", "id",
                "--mode", "rolling", "--stride", "10", "--batch-windows", "3", "--quiet", "--backend", "ort-cpu")
    assert r.returncode == 0, r.stderr
    got = pq.read_table(out).to_pandas()
    # series a: windows end at rows 23, 33, 43, 53; series b: 23, 33
    assert got.groupby("id")["cutoff"].nunique().to_dict() == {"a": 4, "b": 2}
    assert "2 series, 6 windows, 72 forecast rows" in r.stdout
    f = Forecaster.load(str(small_bundle), backend="ort-cpu")
    for sid, frame, end in (("a", a, 53), ("b", b, 33)):
        win = frame.iloc[end - SEQ + 1:end + 1].drop(columns="id")
        rows = got[(got.id == sid) & (got.cutoff == frame.date.iloc[end])].sort_values("step")
        assert_float32_close(rows[["v0", "v1", "v2"]].to_numpy(), f.predict(win))  # batch 3 vs 1
        assert rows.date.iloc[0] == frame.date.iloc[end] + pd.Timedelta(hours=1)
    assert list(rows.step) == list(range(1, PRED + 1))


def test_a_flat_variable_leaks_no_rounding_into_the_others(small_bundle):
    """A variable flat over the window normalises to exactly 0 (RevIN centred on its first value), so the
    other variables' forecasts are the same bits whatever its level; centred on the mean, its rounding ulp
    over sqrt(eps) reached them through the cross-variable attention (6e-3 std between two f32 runtimes)."""
    f = Forecaster.load(str(small_bundle), backend="ort-cpu")
    rng = np.random.default_rng(5)
    x = (20 + 5 * rng.standard_normal((1, SEQ, 3))).astype(np.float32)
    emb = rng.standard_normal((1, 3, f.d_llm)).astype(np.float32)
    others = []
    for level in np.linspace(0.1, 37.3, 20, dtype=np.float32):
        x[0, :, 1] = level
        others.append(f.backend.run_forecaster(x, emb)[0][:, [0, 2]])
    for o in others[1:]:
        np.testing.assert_array_equal(o, others[0])


@pytest.mark.parametrize("bad, message", [
    (lambda d: d.drop(columns="v0"), "lacks variable column(s) ['v0']"),
    (lambda d: d.assign(v0=d.v0.astype(str)), "variable column 'v0' has type large_string; numbers are needed"),
    (lambda d: d.assign(v1=np.where(d.index == 150, np.inf, d.v1)), "column 'v1' at row 150"),
    (lambda d: d.iloc[list(range(0, 120)) + [121, 120] + list(range(122, len(d)))], "row 121: timestamps not sorted"),
    (lambda d: d.iloc[:20], "has 20 rows, fewer than the model's seq_len 24"),
    (lambda d: d.assign(date=d.date + pd.to_timedelta((d.index >= 130) * 60, unit="s")), "row 130: step"),
])
def test_serve_batch_bad_input_leaves_no_output(small_bundle, tmp_path, bad, message):
    inp = _write(bad(make_frame(200, seed=3)), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    r = run_cli(SERVE, inp, "--bundle", str(small_bundle), "--out", str(out), "--mode", "rolling", "--stride", "5",
                "--batch-windows", "2", "--quiet")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not out.exists() and _no_leftovers(tmp_path)


def test_serve_batch_refuses_to_overwrite(small_bundle, tmp_path):
    inp = _write(make_frame(50), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    out.write_bytes(b"keep me")
    r = run_cli(SERVE, inp, "--bundle", str(small_bundle), "--out", str(out))
    assert r.returncode == 2 and "--force" in r.stderr and out.read_bytes() == b"keep me"


def test_concurrent_serves_share_one_store(small_bundle, tmp_path):
    store = tmp_path / "store"
    inputs = [_write(make_frame(120, seed=s % 2), tmp_path / f"in{s}.parquet") for s in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", f"from {SERVE.replace(':', ' import ')}; serve_batch_cmd()",
                               inp, "--bundle", str(small_bundle), "--out", str(tmp_path / f"out{i}.parquet"),
                               "--store", str(store), "--mode", "rolling", "--stride", "4", "--batch-windows", "2",
                               "--backend", "ort-cpu", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, inp in enumerate(inputs)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    outs = [pq.read_table(tmp_path / f"out{i}.parquet").to_pandas() for i in range(3)]
    pd.testing.assert_frame_equal(outs[0], outs[2])  # same input, same forecasts, whoever wrote the store
    ref = Forecaster.load(str(small_bundle), backend="ort-cpu")
    win = make_frame(120, seed=1).iloc[4:28]
    got = outs[1][outs[1].cutoff == win.date.iloc[-1]].sort_values("step")
    assert_float32_close(got[["v0", "v1", "v2"]].to_numpy(), ref.predict(win))


def test_killed_serve_leaves_store_usable_and_no_output(small_bundle, tmp_path):
    store, out = tmp_path / "store", tmp_path / "out.parquet"
    inp = _write(make_frame(3000, seed=4), tmp_path / "in.parquet")
    p = subprocess.Popen([sys.executable, "-c", f"from {SERVE.replace(':', ' import ')}; serve_batch_cmd()", inp,
                          "--bundle", str(small_bundle), "--out", str(out), "--store", str(store), "--mode", "rolling",
                          "--stride", "1", "--batch-windows", "4", "--quiet", "--backend", "ort-cpu"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _no_leftovers(tmp_path) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # let it write a few batches
    assert p.poll() is None, "serve finished before it could be killed; make the input longer"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not out.exists()
    f = Forecaster.load(str(small_bundle), backend="ort-cpu", store=str(store))
    frame = make_frame(3000, seed=4)
    f.predict(frame.iloc[:SEQ])  # the first window was served before the kill (same backend, same precision): hits
    assert f.stats.misses == 0 and f.stats.hits == 3
    r = run_cli(SERVE, _write(frame.iloc[:200], tmp_path / "small.parquet"), "--bundle", str(small_bundle),
                "--out", str(out), "--store", str(store), "--quiet")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def etth1_bundle(tmp_path_factory, tiny_llm_dir):
    """ETTh1 with random forecaster weights (parity does not depend on training), exported."""
    d = tmp_path_factory.mktemp("etth1")
    r = subprocess.run([sys.executable, "-m", "benchmarks.random_checkpoint", "--llm", tiny_llm_dir, "--data",
                        str(ETTH1), "--out", str(d / "best.pt"), "--pred-len", "24", "--channel", "16"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = run_cli("timecma.export.cli:export_cmd", "--ckpt", str(d / "best.pt"), "--parity-windows", "2")
    assert r.returncode == 0, r.stderr
    return d / "bundle", d / "best.pt"


def test_etth1_runtime_matches_pytorch(etth1_bundle, tiny_llm_dir):
    """ort-cpu end to end vs checkpoint + PyTorch LLM: within 1e-4 of each variable's scale."""
    import torch

    from timecma.checkpoint import build_model, load_checkpoint
    from timecma.core.config import ModelConfig
    from timecma.data import load_series
    from timecma.llm import encode_last_token, load_llm
    from timecma.core.prompts import PromptRenderer, get_template
    from timecma.core.tokens import encode_prompts

    bundle, ckpt = etth1_bundle
    c = load_checkpoint(str(ckpt))
    model = build_model(ModelConfig(**c["model_config"]), c["state_dict"]).eval()
    llm = load_llm(tiny_llm_dir)
    s = load_series(ETTH1)
    mean, std = np.array(c["data"]["scaler_mean"]), np.array(c["data"]["scaler_std"])
    renderer = PromptRenderer(get_template("reference"), s.frequency)
    f = Forecaster.load(str(bundle), backend="ort-cpu")
    for start in (12000, 14000, len(s.values) - 96):
        raw, ts = s.values[start:start + 96], s.timestamps[start:start + 96]
        emb = encode_last_token(llm, encode_prompts(llm.backend, renderer.render_series(raw, ts, [0], 96)))
        with torch.inference_mode():
            y = model(torch.from_numpy(((raw - mean) / std).astype(np.float32))[None], torch.from_numpy(emb)[None])
        expected = y[0].numpy() * std + mean
        got = f.predict(raw, ts)
        scale = s.values.std(axis=0)
        assert (np.abs(got - expected) / scale).max() <= 1e-4


def test_auto_backend_says_what_it_picked(small_bundle, caplog):
    import logging

    from timecma.runtime import available_backends

    with caplog.at_level(logging.INFO, logger="timecma"):
        f = Forecaster.load(str(small_bundle))
    avail = available_backends()
    expected = next(b for b in ("tensorrt", "ort-cuda", "openvino", "ort-cpu") if avail[b] == "available")
    assert f.backend.name == expected and f"backend auto -> {expected}" in caplog.text
    assert avail["tensorrt"] != "available" or "tensorrt" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="onnxruntime-gpu and a CUDA GPU are needed (none on this machine)")
def test_ort_cuda_matches_ort_cpu(small_bundle):
    df = make_frame(SEQ, seed=9)
    cpu = Forecaster.load(str(small_bundle), backend="ort-cpu").predict(df)
    gpu = Forecaster.load(str(small_bundle), backend="ort-cuda")
    np.testing.assert_allclose(gpu.predict(df), cpu, rtol=0, atol=1e-4)
    np.testing.assert_allclose(gpu.predict(df), cpu, rtol=0, atol=1e-4)  # CUDA-graph replay


def test_forecaster_is_thread_safe(small_bundle, tmp_path):
    """Threads calling predict at once get exactly what one thread gets, store shared or not."""
    from concurrent.futures import ThreadPoolExecutor

    frame = make_frame(400, seed=21)
    windows = [frame.iloc[i:i + SEQ] for i in range(0, 320, 10)]
    for store in (None, "store"):  # no store: the whole graph; a store: split graphs, misses then window hits
        single = Forecaster.load(str(small_bundle), backend="ort-cpu", store=store and str(tmp_path / "single"))
        expected = [single.predict(w) for w in windows]
        single.close()
        shared = Forecaster.load(str(small_bundle), backend="ort-cpu", store=store and str(tmp_path / store))
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(shared.predict, windows + windows))
        for g, e in zip(got, expected + expected):
            np.testing.assert_array_equal(g, e)
        assert shared.stats.requests == 2 * len(windows)
        shared.close()
