"""Killed runs (SIGKILL, at random points) leave nothing a rerun of the same command does not clean
up, and the rerun's output is byte-identical to an uninterrupted run's."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import make_frame, run_cli
from timecma.core.manifest import read_manifest

SERVE = "timecma.runtime.serving.batch_cli:serve_batch_cmd"
EXPORT = "timecma.export.cli:export_cmd"


def _popen(entry: str, *args: str) -> subprocess.Popen:
    module, func = entry.split(":")
    return subprocess.Popen([sys.executable, "-c", f"from {module} import {func}; {func}()", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _hidden(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith("."))


@pytest.fixture(scope="module")
def serve_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_in")
    path = d / "in.parquet"
    frame = make_frame(600, seed=11)
    pq.write_table(__import__("pyarrow").Table.from_pandas(frame, preserve_index=False), path)
    return path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_serve_batch_is_cleaned_up_and_rerun_matches(small_bundle, serve_input, tmp_path, seed):
    args = ["--bundle", str(small_bundle), "--mode", "rolling", "--stride", "4", "--quiet", "--force"]
    ref = tmp_path / "ref" / "out.parquet"
    ref.parent.mkdir()
    r = run_cli(SERVE, str(serve_input), "--out", str(ref), *args)
    assert r.returncode == 0, r.stderr
    out_dir = tmp_path / "killed"
    out_dir.mkdir()
    out = out_dir / "out.parquet"
    older = out_dir / f".out.parquet.tmp-{_dead_pid()}"
    older.write_bytes(b"partial")  # an older crash's leftover (the next run, killed or not, removes it)
    p = _popen(SERVE, str(serve_input), "--out", str(out), *args)
    time.sleep(random.Random(seed).uniform(0.5, 4.0))
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_left = [n for n in _hidden(out_dir) if n != older.name]
    r = run_cli(SERVE, str(serve_input), "--out", str(out), *args)
    assert r.returncode == 0, r.stderr
    if killed_left:  # killed while writing: its partial file is removed, and said so
        assert "left by a killed run" in r.stderr
    assert out.read_bytes() == ref.read_bytes()
    assert _hidden(out_dir) == []


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_export_is_cleaned_up_and_rerun_is_complete(small_run, tmp_path, seed):
    _, run = small_run
    out = tmp_path / "bundle"
    p = _popen(EXPORT, "--ckpt", str(run / "best.pt"), "--out", str(out), "--force", "--parity-windows", "2")
    time.sleep(random.Random(seed).uniform(4.0, 14.0))
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = run_cli(EXPORT, "--ckpt", str(run / "best.pt"), "--out", str(out), "--force", "--parity-windows", "2")
    assert r.returncode == 0, r.stderr
    read_manifest(out)  # complete: every file present with its recorded sha256
    assert _hidden(tmp_path) == [] and _hidden(out) == [] and _hidden(out / "engines") == [".lock"]


def test_bundle_stranded_between_renames_is_recovered(small_bundle, small_run, tmp_path):
    """A kill after the old bundle was moved aside and before the new one was moved in."""
    _, run = small_run
    old = tmp_path / f".old-bundle-bundle-{_dead_pid()}-x1y2"
    old.mkdir()
    shutil.copytree(small_bundle, old / "b")
    out = tmp_path / "bundle"
    (tmp_path / f".bundle-bundle-{_dead_pid()}-z9").mkdir()  # and the new one, half written
    r = run_cli(EXPORT, "--ckpt", str(run / "best.pt"), "--out", str(out))
    assert r.returncode == 2 and "exists; pass --force" in r.stderr  # the old bundle is back, so export refuses
    assert "recovered the bundle" in r.stderr
    assert json.loads((out / "manifest.json").read_text()) == json.loads((small_bundle / "manifest.json").read_text())
    read_manifest(out)
    assert _hidden(tmp_path) == []


def test_live_runs_temporaries_are_left_alone(tmp_path):
    from timecma.core.leftovers import remove_dead_temporaries

    live = tmp_path / f".out.parquet.tmp-{os.getppid()}"
    dead = tmp_path / f".out.parquet.tmp-{_dead_pid()}"
    live.write_bytes(b"")
    dead.write_bytes(b"")
    assert remove_dead_temporaries(str(tmp_path), ".out.parquet.tmp-", "x") == 1
    assert live.exists() and not dead.exists()
