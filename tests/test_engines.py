"""TensorRT engines built for real (TensorRT-RTX from PyPI, no GPU needed to build), bundle
integrity, engine selection and the runner's input checks. Executing an engine needs a CUDA
GPU: those tests are marked ``gpu`` and skip only where none is visible."""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_float32_close, make_frame, run_cli
from timecma.core.errors import BackendUnavailable, BundleError
from timecma.core.manifest import FileRecord, read_manifest, verify_files
from timecma.runtime.engines import cuda
from timecma.runtime.compile.tensorrt import EngineProfile, build_plan
from timecma.runtime.engines.trt_runner import EngineIO, EngineShapeError
from timecma.runtime.backends.tensorrt import select_engines
from timecma.runtime.engines.trt_flavour import installed, load_flavour

NO_GPU = cuda.device_count() == 0
GPU_REASON = "executing a TensorRT engine needs a CUDA GPU; none is visible to this process"
BLOCK_TORCH = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('torch', 'transformers', 'pandas'):\n"
               "            raise ModuleNotFoundError(f'blocked: {name}')\n"
               "sys.meta_path.insert(0, Block())\n")


def engines_cli(*args: str) -> subprocess.CompletedProcess:
    """`timecma-engines ...` in a fresh interpreter where importing torch fails (a deployment box)."""
    code = BLOCK_TORCH + "from timecma.runtime.compile.cli import engines_cmd\nengines_cmd()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)


def snapshot(d) -> dict:
    """Every file under d (hidden ones too) -> sha256: to prove a refused command changed nothing."""
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _engines(m, precision=None):
    return {e.graph: e for e in m.engines if precision is None or e.precision == precision}


def _check_engine_against_graph(bundle, m, e):
    """What can be checked without a GPU: plan present and hashed, I/O as the manifest promises,
    profile as requested, precisions where the graph puts them."""
    plan = bundle / e.file
    assert plan.stat().st_size > 100_000 and e.bytes == plan.stat().st_size
    assert hashlib.sha256(plan.read_bytes()).hexdigest() == e.sha256 == m.sha256(e.file)
    net, graph = e.network, m.graphs[e.graph]
    assert net["parser_errors"] == 0
    for kind in ("inputs", "outputs"):
        assert set(net[kind]) == set(getattr(graph, kind))
        for name, spec in getattr(graph, kind).items():
            assert net[kind][name]["dtype"] == spec.dtype
            want = [-1 if isinstance(d, str) else d for d in spec.shape]  # "B", "S" are dynamic
            assert net[kind][name]["shape"] == want, (name, net[kind][name]["shape"], want)
    for name, (mn, opt, mx) in e.profile.items():
        assert mn <= opt <= mx and set(e.profile) == set(graph.inputs)
    dts = net["layer_output_dtypes"]
    if e.precision == "fp16":
        conversion = graph.files["fp16"].info["parity_vs_torch_ort_cpu"]["conversion"]
        assert dts["matmul"]["float16"] == conversion["fp16_matmuls"] > 0  # the weight matmuls really run in fp16 ...
        assert set(dts["normalization"]) <= {"float32"}  # ... LayerNorm stays fp32
    else:
        assert "float16" not in dts["all"]


def test_export_builds_rtx_engines_for_both_graphs(small_bundle):
    """`timecma-export` (default --tensorrt build) compiled real TensorRT-RTX engines, no GPU here."""
    m = read_manifest(small_bundle)
    assert m.versions["tensorrt_rtx"] == load_flavour("rtx").version
    eng = _engines(m, "fp16")
    assert set(eng) == {"llm", "forecaster"}
    for e in eng.values():
        assert e.flavour == "tensorrt_rtx" and e.portable and e.compute_capabilities == ["86", "89", "120"]
        assert e.onnx_sha256 == m.sha256(e.onnx_file)
        assert e.file.startswith(f"engines/{e.graph}.fp16.sm86-89-120.trtrtx") and e.info["build_seconds"] > 0
        _check_engine_against_graph(small_bundle, m, e)
        if NO_GPU:
            assert "no CUDA GPU" in e.info["parity_vs_ort_fp32"]["not_measured"]
    # the default profile (opt at N prompts of the real prompts' length; capped at the LLM's positions) is what
    # serving will be limited to
    from timecma.runtime.compile.tensorrt import default_profile

    d = default_profile(m, str(small_bundle))
    assert eng["llm"].profile["input_ids"] == [[1, 1], [3, d.llm_seq[1]], [64, 1024]] and d.llm_batch[1] == 3
    assert eng["forecaster"].profile["x"] == [[1, 24, 3], [1, 24, 3], [64, 24, 3]]


def test_engines_build_adds_fp32_beside_fp16_without_torch(small_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(small_bundle, b)
    r = engines_cli("build", str(b), "--precision", "fp32", "--max-batch", "8", "--max-seq", "128")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("built engines/") == 2
    m = read_manifest(b)  # verifies every file, old engines and new
    assert {(e.graph, e.precision) for e in m.engines} == {
        ("llm", "fp16"), ("forecaster", "fp16"), ("llm", "fp32"), ("forecaster", "fp32")}
    f32 = _engines(m, "fp32")
    # opt: a window's 3 prompts per call, at the length the bundle's validation windows pad them to
    lengths = np.load(b / "parity" / "gate.npz")["llm_attention_mask"].sum(axis=1).reshape(-1, 3)
    opt_seq = int(np.median(lengths.max(axis=1)))
    assert f32["llm"].profile["input_ids"] == [[1, 1], [3, opt_seq], [8, 128]]
    assert f32["forecaster"].profile["prompt_emb"][2] == [8, 3, 32]
    for e in f32.values():
        _check_engine_against_graph(b, m, e)
    # a rebuild of the same slot with another profile replaces the entry and its plan, keeps the rest
    old = f32["llm"].file
    r = engines_cli("build", str(b), "--precision", "fp32", "--graph", "llm", "--max-seq", "64")
    assert r.returncode == 0, r.stderr
    m2 = read_manifest(b)
    assert len(m2.engines) == 4 and not (b / old).exists()
    assert _engines(m2, "fp32")["llm"].profile["input_ids"][2] == [64, 64]
    plans = sorted(n for n in os.listdir(b / "engines") if not n.startswith("."))
    assert plans == sorted(os.path.basename(e.file) for e in m2.engines)
    listing = engines_cli("list", str(b))
    assert listing.returncode == 0 and listing.stdout.count("tensorrt_rtx") == 4


def test_a_refused_fp16_graph_gets_no_engine_and_the_figure_that_refused_it(small_run, tmp_path):
    """An fp16 graph is checked on CPU before any engine is built from it; refused, it leaves no graph
    file and no engine, its figure is in the manifest, and asking for its engine says why."""
    _, run = small_run
    out = tmp_path / "bundle"
    r = run_cli("timecma.export.cli:export_cmd", "--ckpt", str(run / "best.pt"), "--out", str(out),
                "--parity-windows", "2", "--openvino", "skip", "--fp16-gate", "1e-9")
    assert r.returncode == 0, r.stderr
    assert "fp16 graph of llm_last_token.onnx refused" in r.stderr
    m = read_manifest(out)
    for graph in ("llm", "forecaster"):
        refused = m.graphs[graph].info["fp16_rejected"]
        assert "fp16" not in m.graphs[graph].files and not refused["accepted"]
        assert 1e-9 < refused["gate_figure"] < 1e-2 and refused["gate"] == 1e-9  # a real, small figure
    assert not [e for e in m.engines if e.precision == "fp16"] and not list(out.glob("*.fp16.onnx"))
    r = engines_cli("build", str(out), "--precision", "fp16", "--graph", "llm")
    assert r.returncode == 3 and "refused at export" in r.stderr and "--precision fp32" in r.stderr


def test_gpt2_architecture_llm_graph_builds_fp32_and_fp16(tmp_path):
    """GPT-2 blocks at full width (2 layers x 768, 12 heads): the real model's attention pattern parses
    and compiles, strongly typed, in both precisions."""
    import torch
    from transformers import GPT2Config, GPT2Model

    from timecma.export.onnx_export import convert_fp16, export_llm
    from timecma.llm import LastTokenEncoder

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=512, n_positions=1024, n_embd=768, n_layer=2, n_head=12)).eval()
    f32, f16 = str(tmp_path / "llm.onnx"), str(tmp_path / "llm.fp16.onnx")
    export_llm(LastTokenEncoder(model, last_position_only=True), f32, 1024)
    conversion = convert_fp16(f32, f16)
    # block 1: q|k|v, out, fc, proj; the last block, at the last position only, computes q and k|v apart
    assert conversion["fp16_matmuls"] == conversion["matmuls"] == 4 + 5
    fl = load_flavour("rtx")
    shapes = EngineProfile(llm_seq=(1, 256, 512)).shapes("llm", {})
    for path, precision in ((f32, "fp32"), (f16, "fp16")):
        plan, report, warnings, seconds = build_plan(fl, path, shapes, ["86", "89", "120"], True)
        assert len(plan) > 20_000_000  # 2 x 7M block weights + 0.4M embeddings, at least in fp16
        assert report["parser_errors"] == 0 and report["inputs"]["input_ids"] == {"dtype": "int64", "shape": [-1, -1]}
        assert report["outputs"]["last_hidden"] == {"dtype": "float32", "shape": [-1, 768]}
        matmuls = report["layer_output_dtypes"]["matmul"]
        # fp16: the weight matmuls; attention's activation products stay fp32 (the recipe of convert_fp16)
        assert matmuls.get("float16", 0) == (conversion["fp16_matmuls"] if precision == "fp16" else 0)
        assert set(report["layer_output_dtypes"]["softmax"]) == {"float32"}


def _corrupt_bundle_cases(small_bundle, tmp_path):
    def no_fp16_graph(b):
        m = json.loads((b / "manifest.json").read_text())
        del m["graphs"]["llm"]["files"]["fp16"]
        (b / "manifest.json").write_text(json.dumps(m))

    return [
        ("not_a_bundle", lambda b: (b / "manifest.json").unlink(), [], 3, "manifest.json is missing"),
        ("no_onnx", lambda b: (b / "llm_last_token.onnx").unlink(), [], 3, "lacks llm_last_token.onnx"),
        ("no_precision_graph", no_fp16_graph, [], 3, "no fp16 graph for llm"),
        ("seq_beyond_positions", None, ["--max-seq", "2048"], 2, "exceeds the LLM's 1024 positions"),
        ("bad_profile", None, ["--llm-batch", "8,4,2"], 2, "MIN,OPT,MAX"),
        ("bad_precision", None, ["--precision", "int4"], 2, "fp16 and/or fp32"),
        ("rtx_cannot_target_hopper", None, ["--compute-capability", "90"], 2, "Hopper"),
        ("flavour_missing", None, ["--trt-flavour", "standard"], 4, "TensorRT is not installed"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_engine_builds_exit_nonzero_and_leave_bundle_unchanged(small_bundle, tmp_path, case):
    name, mutate, args, code, message = _corrupt_bundle_cases(small_bundle, tmp_path)[case]
    if name == "flavour_missing" and not installed()["tensorrt"].startswith("not installed"):
        pytest.skip("standard TensorRT is installed here")
    b = tmp_path / "b"
    shutil.copytree(small_bundle, b)
    if mutate:
        mutate(b)
    before = snapshot(b)
    r = engines_cli("build", str(b), *args)
    assert r.returncode == code and message in r.stderr, (r.returncode, r.stderr[-800:])
    assert "Traceback" not in r.stderr
    assert snapshot(b) == before


def test_corrupt_files_are_named_once_and_hashes_are_cached(small_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(small_bundle, b)
    m = read_manifest(b, verify=False)
    assert verify_files(b, m) == len(m.files)  # a new copy: every file hashed once
    assert verify_files(b, m) == 0  # same size and mtime: no rehash
    plan = b / _engines(m, "fp16")["llm"].file
    good = plan.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # same size, other content
    plan.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"bundle file engines/llm\.fp16.*is corrupt.*timecma-engines build"):
        read_manifest(b)
    plan.write_bytes(good)
    read_manifest(b)
    with open(b / "forecaster.onnx", "r+b") as f:
        f.truncate(1000)
    from timecma.runtime import Forecaster

    with pytest.raises(BundleError, match=r"forecaster\.onnx is corrupt or truncated.*re-export"):
        Forecaster.load(str(b), backend="ort-cpu")
    r = engines_cli("verify", str(b))
    assert r.returncode == 3 and "forecaster.onnx is corrupt or truncated" in r.stderr


def test_verify_summarises_and_says_which_backends_run_here(small_bundle):
    r = engines_cli("verify", str(small_bundle))
    assert r.returncode == 0, r.stderr
    assert "files verified (sha256)" in r.stdout and "backend ort-cpu: can run here" in r.stdout
    assert "engine llm fp16: tensorrt_rtx" in r.stdout and "graph forecaster:" in r.stdout
    if NO_GPU:
        assert "backend tensorrt: tensorrt_rtx" in r.stdout and "no CUDA GPU" in r.stdout


def test_engine_selection_by_gpu_flavour_and_version(small_bundle):
    m = read_manifest(small_bundle)
    v = load_flavour("rtx").version
    here = {"tensorrt": "not installed: x", "tensorrt_rtx": v}
    chosen = select_engines(m, "B", "89", here)
    assert chosen["llm"].precision == "fp16" and chosen["forecaster"].flavour == "tensorrt_rtx"
    with pytest.raises(BackendUnavailable) as e:  # a plan built by another version is not used
        select_engines(m, "B", "86", {**here, "tensorrt_rtx": "9.9.9"})
    msg = str(e.value)
    assert f"TensorRT-RTX {v} fp16 for portable 8.6/8.9/12.0" in msg and "sm86 with TensorRT-RTX 9.9.9" in msg
    assert "`timecma-engines build B --trt-flavour rtx --precision fp16`" in msg
    with pytest.raises(BackendUnavailable, match="does not list Hopper"):
        select_engines(m, "B", "90", here)
    with pytest.raises(BackendUnavailable, match="--compute-capability 75"):  # Turing needs its own build
        select_engines(m, "B", "75", here)
    with pytest.raises(BackendUnavailable, match="no TensorRT flavour is installed"):
        select_engines(m, "B", "89", {"tensorrt": "not installed: a", "tensorrt_rtx": "not installed: b"})
    stale = dataclasses.replace(m, files={**m.files, chosen["llm"].onnx_file: FileRecord("0" * 64, 1)})
    with pytest.raises(BackendUnavailable, match="no llm engine runs here"):  # built from another graph
        select_engines(stale, "B", "89", here)


def test_engine_io_refuses_feeds_outside_the_profile(small_bundle):
    io = EngineIO.from_manifest(_engines(read_manifest(small_bundle), "fp16")["llm"])
    ok = {"input_ids": np.ones((7, 30), np.int64), "attention_mask": np.ones((7, 30), np.int64)}
    io.check(ok)
    with pytest.raises(EngineShapeError, match=r"'input_ids' dimension 0 is 65, outside the engine's profile \[1, 64\]"):
        io.check({k: np.ones((65, 30), np.int64) for k in ok})
    with pytest.raises(EngineShapeError, match="dimension 1 is 1025"):
        io.check({k: np.ones((1, 1025), np.int64) for k in ok})
    with pytest.raises(EngineShapeError, match="dtype int32; the engine takes int64"):
        io.check({**ok, "input_ids": ok["input_ids"].astype(np.int32)})
    with pytest.raises(EngineShapeError, match=r"missing \['attention_mask'\]"):
        io.check({"input_ids": ok["input_ids"]})


def test_pipeline_keeps_within_engine_limits(small_bundle):
    """Serving splits windows and LLM calls to the profile's maxima and names a prompt too long for it."""
    from timecma.runtime import Forecaster
    from timecma.runtime.backends.ort import OrtBackend
    from timecma.core.tokens import PromptTooLongError

    m = read_manifest(small_bundle)
    frame = make_frame(200, seed=3)
    vals = frame[["v0", "v1", "v2"]].to_numpy()
    ts = frame["date"].to_numpy()
    windows = np.stack([vals[i:i + 24] for i in range(0, 100, 20)])
    stamps = np.stack([ts[i:i + 24] for i in range(0, 100, 20)])
    free = Forecaster(str(small_bundle), m, OrtBackend(str(small_bundle), m), None)
    bounded_backend = OrtBackend(str(small_bundle), m)
    bounded_backend.limits = {"llm_batch": 2, "llm_seq": 1024, "forecast_batch": 2}
    bounded = Forecaster(str(small_bundle), m, bounded_backend, None)
    assert_float32_close(bounded.predict_many(windows, stamps), free.predict_many(windows, stamps))
    assert bounded.stats.llm_calls >= 8 and free.stats.llm_calls < bounded.stats.llm_calls  # 15 prompts, 2 a call
    short_backend = OrtBackend(str(small_bundle), m)
    short_backend.limits = {"llm_seq": 10}
    with pytest.raises(PromptTooLongError, match="the TensorRT engine's profile allows at most 10 tokens"):
        Forecaster(str(small_bundle), m, short_backend, None).predict_many(windows[:1], stamps[:1])


# --- on a GPU ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=GPU_REASON)
def test_tensorrt_backend_matches_ort_cpu(small_bundle, tmp_path):
    from timecma.runtime import Forecaster

    b = tmp_path / "b"
    shutil.copytree(small_bundle, b)
    r = engines_cli("build", str(b), "--precision", "fp32,fp16")  # for this GPU, parity measured here
    assert r.returncode == 0, r.stderr
    m = read_manifest(b)
    for e in m.engines:  # gated on this GPU: the bundle's validation windows, batch > 1 and batch 1
        gate = e.info["parity_vs_ort_fp32"]
        assert gate["accepted"] and gate["gpu"] == f"sm{cuda.current_capability()}", gate
        assert gate["windows"] > 1 and 1 in gate["batch_sizes"] and max(gate["batch_sizes"]) > 1, gate
        if e.precision == "fp32":
            assert gate["forecast_max_abs_change_normalized"] <= 1e-4, gate
    df = make_frame(24, seed=9)
    std = make_frame(500)[["v0", "v1", "v2"]].to_numpy().std(axis=0)
    cpu = Forecaster.load(str(b), backend="ort-cpu").predict(df)
    for precision, tol in (("fp32", 1e-4), ("fp16", 1e-2)):
        with Forecaster.load(str(b), backend="tensorrt", precision=precision) as f:
            assert f.backend.engines["llm"].precision == precision
            for _ in range(2):  # buffers reused
                assert (np.abs(f.predict(df) - cpu) / std).max() <= tol


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason=GPU_REASON)
def test_engine_runner_checks_shapes_and_frees_memory(small_bundle):
    from timecma.runtime.engines.trt_runner import EngineRunner
    from timecma.runtime.engines.trt_flavour import flavour_named

    m = read_manifest(small_bundle)
    e = _engines(m, "fp16")["forecaster"]
    rt = cuda.CudaRuntime()
    free0, _ = rt.mem_info()
    with EngineRunner(flavour_named(e.flavour), str(small_bundle / e.file)) as r:
        with pytest.raises(EngineShapeError, match="outside the engine's profile"):
            r({"x": np.zeros((65, 24, 3), np.float32), "prompt_emb": np.zeros((65, 3, 32), np.float32)})
        y = r({"x": np.zeros((2, 24, 3), np.float32), "prompt_emb": np.zeros((2, 3, 32), np.float32)})["y"]
        assert y.shape == (2, 12, 3) and np.isfinite(y).all()
    with pytest.raises(RuntimeError, match="closed"):
        r({})
    assert rt.mem_info()[0] >= free0 - (64 << 20)


def test_only_the_flavour_module_imports_tensorrt():
    """What differs between the flavours lives in one module; nothing else imports TensorRT."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("timecma", "export", "runtime", "benchmarks"):
        for path in (repo / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                # absolute imports only: `from .tensorrt import ...` is the runtime's own backend module
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                if any(n.split(".")[0] in ("tensorrt", "tensorrt_rtx") for n in names):
                    offenders.append(str(path.relative_to(repo)))
    assert offenders == []  # runtime/engines/trt_flavour.py imports the flavour by name (importlib), on request
