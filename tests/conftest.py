"""Shared fixtures: an offline tiny GPT-2 saved with save_pretrained, and small series."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: a wrong model id fails at once instead of retrying
# hermetic user cache (verified-file hashes, TensorRT caches) for this test session and its subprocesses
os.environ.setdefault("TIMECMA_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="timecma-test-cache-"))
REPO = Path(__file__).resolve().parents[1]
ETTH1 = REPO / "timecma" / "datasets" / "ETTh1.csv"


def assert_float32_close(got, want) -> None:
    """Two float32 paths to one result (the split prompt encoder + head against the whole forecaster, other
    batch sizes, other thread counts) round differently: kernels block and split their sums by shape and by
    the CPU's vector width and cores, so CPUs differ in the last bits. Equal to 1e-5 of the result's scale
    (about 100 float32 ulps), never bit for bit; one path served twice stays bit-exact (assert_array_equal)."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> str:
    """Random-weight GPT-2 (GPT2Config) + locally trained tokenizer, loaded back via from_pretrained(dir)."""
    from timecma.llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), seed=0)


@pytest.fixture(scope="session")
def other_llm_dir(tmp_path_factory) -> str:
    """Same architecture, other weights: a different store namespace."""
    from timecma.llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("other_llm"), seed=1)


def make_frame(n_rows: int = 500, n_vars: int = 3, seed: int = 0, freq: str = "h") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = np.arange(n_rows)
    cols = {"date": pd.date_range("2020-01-01", periods=n_rows, freq=freq)}
    for j in range(n_vars):
        cols[f"v{j}"] = 10 * (j + 1) * np.sin(2 * np.pi * t / 24 + j) + rng.normal(0, 1, n_rows) + 5 * j
    return pd.DataFrame(cols)


@pytest.fixture()
def small_csv(tmp_path) -> str:
    path = tmp_path / "small.csv"
    make_frame().to_csv(path, index=False)
    return str(path)


TRAIN_ARGS = ["--seq-len", "24", "--pred-len", "12", "--epochs", "2", "--batch-size", "16", "--channel", "16",
              "--e-layer", "1", "--d-layer", "1", "--device", "cpu"]


def run_cli(entry: str, *args: str) -> "subprocess.CompletedProcess":  # noqa: F821 (imported inside)
    """Run a console entry point (module:function) in a fresh interpreter, as a user would."""
    import subprocess
    import sys

    module, func = entry.split(":")
    return subprocess.run([sys.executable, "-c", f"from {module} import {func}; {func}()", *args],
                          capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, tiny_llm_dir):
    """A small series trained once for the session: (data csv, run dir with best.pt)."""
    d = tmp_path_factory.mktemp("train")
    data = d / "small.csv"
    make_frame().to_csv(data, index=False)
    out = d / "run"
    r = run_cli("timecma.cli:train_cmd", "--data", str(data), "--llm", tiny_llm_dir, "--out", str(out), *TRAIN_ARGS)
    assert r.returncode == 0, r.stderr
    return data, out


@pytest.fixture(scope="session")
def small_bundle(small_run):
    """The small run exported once for the session."""
    data, out = small_run
    r = run_cli("timecma.export.cli:export_cmd", "--ckpt", str(out / "best.pt"))
    assert r.returncode == 0, r.stderr
    return out / "bundle"


def bundle_with_manifest_version(bundle, dest, version: int):
    """A copy of ``bundle`` whose manifest claims another version (to test refusals)."""
    import json
    import shutil

    shutil.copytree(bundle, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["manifest_version"] = version
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest
