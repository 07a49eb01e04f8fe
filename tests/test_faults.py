"""Faults are named and the store is a cache (issue 24, part 6): a full disk under the output or the store, and an
LMDB map that is full. The full disks are real: small tmpfs mounts (root only; skipped elsewhere, with the reason)."""

from __future__ import annotations

import contextlib
import os
import subprocess

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import TRAIN_ARGS, make_frame, run_cli
from timecma.core.errors import EXIT_WRITE
from timecma.core.store import EmbeddingStore, StoreWriteError

SERVE = "timecma.runtime.serving.batch_cli:serve_batch_cmd"


@contextlib.contextmanager
def full_disk(path, size: str = "64k"):
    """A tmpfs of ``size`` mounted at ``path`` (a real ENOSPC when it fills)."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill a disk ({r.stderr.strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _input(tmp_path, rows: int = 300) -> str:
    path = tmp_path / "in.parquet"
    pq.write_table(__import__("pyarrow").Table.from_pandas(make_frame(rows, seed=7), preserve_index=False), path)
    return str(path)


def test_map_full_store_refuses_the_batch_and_keeps_what_it_had(tmp_path):
    with EmbeddingStore(tmp_path / "s", "ab" * 32, 256, map_size=64 << 10) as st:
        st.put_many([b"k%03d" % i for i in range(4)], np.ones((4, 256), np.float32))
        with pytest.raises(StoreWriteError, match=r"embedding store .* cannot be written \(MapFullError"):
            st.put_many([b"x%03d" % i for i in range(200)], np.zeros((200, 256), np.float32))
        assert len(st) == 4 and st.get_many([b"k000"])[1].all()  # all or nothing


def test_output_on_a_full_disk_is_named_and_leaves_nothing(small_bundle, tmp_path):
    inp = _input(tmp_path, 2000)
    with full_disk(tmp_path / "full", "16k") as d:
        out = d / "fc.parquet"
        r = run_cli(SERVE, inp, "--bundle", str(small_bundle), "--out", str(out), "--mode", "rolling",
                    "--stride", "1", "--quiet", "--backend", "ort-cpu")
        assert r.returncode == EXIT_WRITE, r.stderr
        assert f"cannot write the output {out}" in r.stderr and "No space left on device" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and os.listdir(d) == []  # no partial output, no temporary


def test_store_on_a_full_disk_serves_uncached_and_training_stops_named(small_bundle, tiny_llm_dir, tmp_path):
    inp = _input(tmp_path, 1500)
    ref = tmp_path / "ref.parquet"
    r = run_cli(SERVE, inp, "--bundle", str(small_bundle), "--out", str(ref), "--mode", "rolling", "--stride", "1",
                "--quiet", "--backend", "ort-cpu")
    assert r.returncode == 0, r.stderr
    with full_disk(tmp_path / "full", "320k") as d:  # room to open the store, not for ~4,400 prompts' vectors
        out = tmp_path / "fc.parquet"
        r = run_cli(SERVE, inp, "--bundle", str(small_bundle), "--out", str(out), "--store", str(d / "store"),
                    "--mode", "rolling", "--stride", "1", "--quiet", "--backend", "ort-cpu")
        assert r.returncode == 0, r.stderr
        assert "could not be written" in r.stdout and r.stderr.count("serving goes on uncached") == 1  # warned once
        pd.testing.assert_frame_equal(pq.read_table(out).to_pandas(), pq.read_table(ref).to_pandas())
        data = tmp_path / "small.csv"
        make_frame().to_csv(data, index=False)
        r = run_cli("timecma.cli:train_cmd", "--data", str(data), "--llm", tiny_llm_dir, "--out",
                    str(tmp_path / "run"), "--store", str(d / "train-store"), *TRAIN_ARGS)
        assert r.returncode == EXIT_WRITE and "embedding store" in r.stderr and "bytes free" in r.stderr, r.stderr
        assert not (tmp_path / "run" / "best.pt").exists()
