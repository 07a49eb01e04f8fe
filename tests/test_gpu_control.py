"""The GPU branches' control flow, run on a CPU-only machine: `timecma-engines verify`, `auto`'s backend
choice, engine selection, the engine gate's decisions and the steps of `make gpu-check`, each up to its
first CUDA call.

What a GPU would tell (that one is visible, its compute capability) is supplied at the seams the code asks
it through: ``available_backends`` and ``engines.cuda.current_capability``. Where an engine's outputs are
needed they are supplied at the gate's seam (``open_engine``) and said to be supplied: no test here
executes a TensorRT engine, and none claims one ran. Engine execution stays unverified until a GPU runs
the ``gpu``-marked tests (tests/test_engines.py)."""

import ast
import contextlib
import dataclasses
import importlib
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO
from timecma.core.errors import BackendUnavailable
from timecma.core.manifest import read_manifest
from timecma.runtime.backends import select
from timecma.runtime.backends.tensorrt import select_engines
from timecma.runtime.engines import cuda
from timecma.runtime.engines.trt_flavour import load_flavour

PARITY_KEY = "parity_vs_ort_fp32"  # an engine's gate record in the manifest
RTX = {"tensorrt": "not installed: no", "tensorrt_rtx": load_flavour("rtx").version}
GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"
# what the first CUDA call says on a machine without a GPU: with libcudart installed, or without it
FIRST_CUDA_CALL = r"no CUDA GPU is visible|libcudart\) was not found"


def _gpu_here(monkeypatch, cc: str | None, ort_cuda: bool = False) -> None:
    """Supply what a GPU machine would report: the backends that can run, and this GPU's compute capability."""
    avail = {"tensorrt": "available" if cc else "no CUDA GPU", "ort-cuda": "available" if ort_cuda else
             "onnxruntime has no CUDA provider", "openvino": "openvino not installed", "ort-cpu": "available",
             "torch": "torch not installed"}
    monkeypatch.setattr(select, "available_backends", lambda: dict(avail))
    monkeypatch.setattr(cuda, "current_capability", lambda: cc, raising=False)  # (absent before it was the seam)


def _copy(bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    return b


def _snapshot(d) -> dict:
    import hashlib

    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in Path(d).rglob("*") if p.is_file() and p.name != ".lock"}


# --- imports on the GPU-only branches ---------------------------------------------------------------------------
def _lazy_imports():
    """Every ``from X import name`` inside a function body of the runtime, export and training code: imports
    that run only on the path that needs them (GPU, OpenVINO, torch on request), which CPU tests may never take."""
    found = []
    for folder, pkg in (("runtime", "timecma.runtime"), ("export", "timecma.export"), ("timecma", "timecma")):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("").parts
            package = [pkg, *rel[:-1]]  # the package a module (or an __init__) sits in
            for fn in ast.walk(ast.parse(path.read_text())):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    if not isinstance(node, ast.ImportFrom):
                        continue
                    if node.level:
                        base = package[:len(package) - node.level + 1]
                        module = ".".join(base + ([node.module] if node.module else []))
                    else:
                        module = node.module or ""
                    if module.split(".")[0] == "timecma":
                        found.append((f"{path.relative_to(REPO)}:{node.lineno}", module, [a.name for a in node.names]))
    return found


def test_every_lazy_import_of_the_project_resolves():
    """`from .cuda import CudaRuntime` in `timecma-engines verify` ran only where TensorRT can run, and named
    a module that moved to runtime/engines/: importing each lazily imported module by name finds such a line
    on any machine."""
    lazy = _lazy_imports()
    assert len(lazy) > 20  # the walk sees the function-level imports (verify's among them)
    broken = []
    for where, module, names in lazy:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] == "timecma":  # not an optional dependency missing here
                broken.append(f"{where}: {module} ({exc})")
            continue
        except ImportError:
            continue  # an optional dependency (openvino, nncf) that this machine lacks
        for name in names:
            if not hasattr(mod, name):
                with contextlib.suppress(ModuleNotFoundError):
                    importlib.import_module(f"{module}.{name}")
                    continue
                broken.append(f"{where}: {module} has no {name}")
    assert broken == []


# --- timecma-engines verify --------------------------------------------------------------------------------------
def _verify(bundle) -> "object":
    from timecma.runtime.compile.cli import engines_cmd

    return CliRunner().invoke(engines_cmd, ["verify", str(bundle)])


def test_verify_on_a_gpu_machine_selects_the_engines_it_would_run(small_bundle, monkeypatch):
    """With TensorRT available and an sm89 GPU supplied, verify reaches engine selection and says which
    engines would run (not yet gated: they were built without a GPU); it used to die on an import."""
    _gpu_here(monkeypatch, "89")
    r = _verify(small_bundle)
    assert r.exit_code == 0, (r.output, r.exception)
    line = next(ln for ln in r.output.splitlines() if "backend tensorrt:" in ln)
    assert line.strip().startswith("backend tensorrt: can run here on sm89")
    assert "llm fp16 tensorrt_rtx (not gated)" in line and "forecaster fp16 tensorrt_rtx (not gated)" in line


@pytest.mark.parametrize("cc, why", [("90", "does not list Hopper"), ("75", "--compute-capability 75"),
                                     (None, "no CUDA GPU is visible")])
def test_verify_says_why_tensorrt_cannot_run_on_the_gpu_supplied(small_bundle, monkeypatch, cc, why):
    _gpu_here(monkeypatch, "89")
    monkeypatch.setattr(cuda, "current_capability", lambda: cc, raising=False)  # TensorRT "available", this GPU
    r = _verify(small_bundle)
    assert r.exit_code == 0, (r.output, r.exception)
    line = next(ln for ln in r.output.splitlines() if "backend tensorrt:" in ln)
    assert "can run here" not in line and why in line


# --- auto's backend choice ---------------------------------------------------------------------------------------
def test_auto_selects_engines_before_its_first_cuda_call_and_falls_back(small_bundle, monkeypatch, caplog):
    """`auto` with TensorRT available: on sm89 the bundle's engines are selected and the backend stops at its
    first CUDA call (no GPU is really here), so auto falls back to the next backend and says why; on sm90 the
    selection itself refuses (TensorRT-RTX does not list Hopper), before any CUDA call."""
    m = read_manifest(small_bundle)
    for cc, why in (("89", r"tensorrt unusable \((" + FIRST_CUDA_CALL + ")"), ("90", "does not list Hopper")):
        _gpu_here(monkeypatch, cc)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="timecma.runtime.backends"):
            backend = select.make_backend("auto", str(small_bundle), m)
        try:
            assert backend.name == "ort-cpu"
        finally:
            backend.close()
        text = caplog.text
        assert "tensorrt unusable" in text and re.search(why, text), text
        assert "backend auto -> ort-cpu" in text
        if cc == "89":  # it got past selection: the warning for engines never run on a GPU came first
            assert "has not been checked against ONNX Runtime on a GPU" in text


def test_forced_tensorrt_backend_says_why_and_auto_without_gpu_skips_it(small_bundle, monkeypatch):
    m = read_manifest(small_bundle)
    _gpu_here(monkeypatch, None)
    with pytest.raises(BackendUnavailable, match="backend tensorrt is not usable here"):
        select.make_backend("tensorrt", str(small_bundle), m)
    backend = select.make_backend("auto", str(small_bundle), m)
    assert backend.name == "ort-cpu"
    backend.close()


# --- engine selection by gate -----------------------------------------------------------------------------------
def _with_fp32_twins(m, fp16_record: dict | None, fp32_record: dict | None):
    """The manifest with an fp32 engine beside each fp16 one (entries only; selection reads no plan), and the
    given gate records."""
    engines = []
    for e in m.engines:
        f32 = m.graphs[e.graph].files["fp32"].file
        twin = dataclasses.replace(e, precision="fp32", file=e.file.replace(".fp16.", ".fp32."), onnx_file=f32,
                                   onnx_sha256=m.sha256(f32), info={**e.info})
        for entry, rec in ((e, fp16_record), (twin, fp32_record)):
            entry.info = {**entry.info, PARITY_KEY: rec or {"not_measured": "no CUDA GPU on the build machine"}}
            engines.append(entry)
    return dataclasses.replace(m, engines=engines)


ACCEPTED_89 = {"accepted": True, "gpu": "sm89"}
ACCEPTED_86 = {"accepted": True, "gpu": "sm86"}
REFUSED_89 = {"accepted": False, "gpu": "sm89"}


@pytest.mark.parametrize("fp16, fp32, want", [
    (None, ACCEPTED_89, "fp32"),  # an engine that passed on this GPU before one never run on a GPU
    (REFUSED_89, ACCEPTED_89, "fp32"),  # a refused engine is never chosen
    (ACCEPTED_86, ACCEPTED_89, "fp32"),  # passed here before passed on another GPU
    (ACCEPTED_89, ACCEPTED_89, "fp16"),  # equal evidence: the wanted precision
    (None, None, "fp16"),
])
def test_engine_selection_prefers_gated_engines_and_never_takes_a_refused_one(small_bundle, fp16, fp32, want):
    m = _with_fp32_twins(read_manifest(small_bundle), fp16, fp32)
    chosen = select_engines(m, "B", "89", RTX)
    assert {g: e.precision for g, e in chosen.items()} == {"llm": want, "forecaster": want}


def test_engine_selection_refuses_when_only_refused_engines_fit(small_bundle):
    from timecma.runtime.backends.tensorrt import gate_state

    m = _with_fp32_twins(read_manifest(small_bundle), REFUSED_89, REFUSED_89)
    assert gate_state(m.engines[0], "89") == "refused"
    with pytest.raises(BackendUnavailable, match=r"no (llm|forecaster) engine runs here: .*fp16 for portable "
                                                 r"8\.6/8\.9/12\.0 \(refused by its gate on sm89\)"):
        select_engines(m, "B", "89", RTX)


# --- the gate's decision, outputs supplied ------------------------------------------------------------------------
def _case(seed=0, w=4, pred=6, n=3, d=16):
    rng = np.random.default_rng(seed)
    mean, std = rng.normal(0, 5, n).astype(np.float32), rng.uniform(1, 10, n).astype(np.float32)
    y_ref = (mean + std * rng.normal(0, 1, (w, pred, n))).astype(np.float32)
    truth = ((y_ref - mean) / std + rng.normal(0, 0.5, y_ref.shape)).astype(np.float32)
    emb_ref = rng.normal(0, 1, (w * n, d)).astype(np.float32)
    return y_ref, truth, mean, std, emb_ref


def test_engine_gate_verdict_accepts_equal_outputs_and_records_the_figures():
    from timecma.core.accuracy import EMBEDDING_GATE, FORECAST_GATE
    from timecma.runtime.compile.openvino import GATE
    from timecma.core.accuracy import judge_variant  # the decision an engine's gate takes

    y_ref, truth, mean, std, emb_ref = _case()
    v = judge_variant(y_ref.copy(), y_ref, truth, mean, std, emb_ref.copy(), emb_ref)
    assert v["accepted"] and v["forecast_max_abs_change_normalized"] == 0 and v["mse_rel_change"] == 0
    assert v["embedding"]["prompt_rel_l2_max"] == 0 and v["embedding"]["prompts"] == len(emb_ref)
    assert (v["embedding"]["gate"], v["forecast_gate"], v["mse_gate"]) == (EMBEDDING_GATE, FORECAST_GATE, GATE)


def test_engine_gate_verdict_sees_a_damaged_prompt_that_the_largest_activation_hides():
    """An LLM with a few huge activations: one prompt's embedding 10% off (relative L2) is under 1e-3 of the
    largest activation, which the old figure divided by; the worst prompt's relative L2 refuses it."""
    from timecma.core.accuracy import judge_variant  # the decision an engine's gate takes

    y_ref, truth, mean, std, emb_ref = _case()
    emb_ref[0, 0] = 3000.0  # an outlier activation on another prompt
    emb = emb_ref.copy()
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1, emb.shape[1]).astype(np.float32)
    emb[5] += 0.1 * np.linalg.norm(emb_ref[5]) * noise / np.linalg.norm(noise)
    old_figure = np.abs(emb - emb_ref).max() / np.abs(emb_ref).max()
    assert old_figure < 1e-3
    v = judge_variant(y_ref, y_ref, truth, mean, std, emb, emb_ref)
    assert not v["accepted"] and 0.09 < v["embedding"]["prompt_rel_l2_max"] < 0.11


@pytest.mark.parametrize("moved, accepted", [(0.002, True), (0.02, False)])
def test_engine_gate_verdict_judges_the_forecast_in_normalised_units(moved, accepted):
    from timecma.core.accuracy import judge_variant  # the decision an engine's gate takes

    y_ref, truth, mean, std, _ = _case()
    y = y_ref.copy()
    y[2, 3, 1] += moved * std[1]  # one value of one window, in the variable's own units
    v = judge_variant(y, y_ref, truth, mean, std)
    assert v["accepted"] is accepted and v["forecast_max_abs_change_normalized"] == pytest.approx(moved, rel=1e-3)
    assert "embedding" not in v  # the forecaster is judged by its forecast


def test_engine_gate_verdict_refuses_non_finite_outputs():
    from timecma.core.accuracy import judge_variant  # the decision an engine's gate takes

    y_ref, truth, mean, std, emb_ref = _case()
    y = y_ref.copy()
    y[0, 0, 0] = np.nan
    assert not judge_variant(y, y_ref, truth, mean, std)["accepted"]
    emb = emb_ref.copy()
    emb[1, 1] = np.inf
    v = judge_variant(y_ref, y_ref, truth, mean, std, emb, emb_ref)
    assert not v["accepted"] and not v["finite"]


# --- the gate's runs: chunks within the profile, windows at batch > 1 and at 1 ------------------------------------
def _ort_runners(bundle, m):
    """ONNX Runtime fp32 sessions standing where an engine would (labelled: no engine runs here), recording the
    shape of every call so the test can check what the gate asks of a profile."""
    from timecma.runtime.backends.base import forecaster_feeds
    from timecma.runtime.backends.ort import ort_session

    llm = ort_session(str(bundle / m.graphs["llm"].files["fp32"].file))
    fc = ort_session(str(bundle / m.graphs["forecaster"].files["fp32"].file))
    calls = {"llm": [], "forecaster": []}

    def run_llm(a, msk):
        calls["llm"].append(a.shape)
        return llm.run(None, {"input_ids": a, "attention_mask": msk})[0]

    def run_fc(x, e):
        calls["forecaster"].append(x.shape)
        return fc.run(None, forecaster_feeds(x, e))[0]

    return run_llm, run_fc, calls


def test_gate_runs_the_llm_in_chunks_within_its_profile_and_the_forecaster_at_batch_above_one(small_bundle):
    """N (3) above the profile's 2 prompts per call: the LLM check runs in chunks that fit, each cut to its
    longest prompt; the forecaster runs several windows per call and each at batch 1. ONNX Runtime fp32
    stands in for the engine, so the figures are at rounding level and the verdict is accept."""
    from timecma.runtime.compile.tensorrt import EngineGate, EngineProfile

    m = read_manifest(small_bundle)
    gate = EngineGate(str(small_bundle), m, max_seq=1024)
    assert len(gate.x) >= 4 and gate.emb_ref.shape == (len(gate.x), 3, m.model_config.d_llm)
    run_llm, run_fc, calls = _ort_runners(small_bundle, m)
    profile = EngineProfile(llm_batch=(1, 2, 2), llm_seq=(1, 96, 128), forecast_batch=(1, 1, 4))
    v = gate.judge("llm", run_llm, profile.shapes("llm", m.model_config))
    lengths = gate.mask.sum(axis=1)
    assert all(b <= 2 and s <= 128 for b, s in calls["llm"]) and (1, int(lengths[0])) in calls["llm"]
    assert sum(b for b, _ in calls["llm"]) == len(gate.ids) + 1  # every prompt once in chunks, one alone
    assert v["accepted"] and v["batch_sizes"] == [1, 2] and v["embedding"]["prompt_rel_l2_max"] < 1e-5
    v = gate.judge("forecaster", run_fc, profile.shapes("forecaster", m.model_config))
    assert max(b for b, *_ in calls["forecaster"]) == 4 and v["batch_sizes"] == [1, 4]
    assert v["accepted"] and v["windows"] == len(gate.x) and v["forecast_max_abs_change_normalized"] < 1e-4


def test_gate_pads_calls_up_to_a_profile_minimum(small_bundle):
    from timecma.runtime.compile.tensorrt import EngineGate, llm_in_profile

    m = read_manifest(small_bundle)
    run_llm, _, calls = _ort_runners(small_bundle, m)
    gate = EngineGate(str(small_bundle), m, windows=2)
    emb, sizes = llm_in_profile(run_llm, gate.ids, gate.mask, (4, 4, 4), (100, 100, 128), m.llm.pad_id)
    assert all(shape == (4, 100) for shape in calls["llm"]) and sizes == [4, 4]  # 6 prompts: 4 + (2 grown to 4)
    np.testing.assert_allclose(emb, gate.emb_ref.reshape(len(emb), -1), rtol=1e-4, atol=1e-5)


def test_gate_refuses_an_llm_whose_outputs_drift_on_one_prompt(small_bundle):
    """Outputs supplied at the seam: ONNX Runtime fp32's embeddings with one prompt moved 10% (relative L2)."""
    from timecma.runtime.compile.tensorrt import EngineGate, EngineProfile

    m = read_manifest(small_bundle)
    gate = EngineGate(str(small_bundle), m)
    run_llm, _, _ = _ort_runners(small_bundle, m)
    first = {"done": False}

    def drifting(a, msk):
        out = run_llm(a, msk)
        if not first["done"]:
            out = out.copy()
            out[0] *= 1.1
            first["done"] = True
        return out

    v = gate.judge("llm", drifting, EngineProfile().shapes("llm", m.model_config))
    assert not v["accepted"] and v["embedding"]["prompt_rel_l2_max"] == pytest.approx(0.1, rel=1e-3)


# --- the opt point from the bundle's prompts ---------------------------------------------------------------------
def test_default_profile_takes_its_opt_point_from_the_real_prompts_and_n(small_bundle):
    from timecma.runtime.compile.openvino import GATE_FILE
    from timecma.runtime.compile.tensorrt import default_profile

    m = read_manifest(small_bundle)
    n = m.model_config.num_nodes
    lengths = np.load(small_bundle / GATE_FILE)["llm_attention_mask"].sum(axis=1).reshape(-1, n)
    p = default_profile(m, str(small_bundle))
    assert p.llm_batch == (1, n, 64)  # a window's N prompts per call
    assert p.llm_seq == (1, int(np.median(lengths.max(axis=1))), 1024)  # the length a window's prompts pad to
    assert p.llm_seq[1] != 256 and p.forecast_batch == (1, 1, 64)
    big = dataclasses.replace(m, model_config=dataclasses.replace(m.model_config, num_nodes=321))
    assert default_profile(big).llm_batch == (1, 64, 64)  # ECL: opt at the maximum, the gate then chunks


# --- build: refused engines are not added; replacements are atomic ----------------------------------------------
def _supplied_outputs(bundle, m, damage: float):
    """An ``open_engine`` that hands the gate ONNX Runtime fp32's outputs (times 1 + ``damage``) as an engine's:
    outputs supplied at the seam to drive the build's decision. No engine runs."""
    run_llm, run_fc, _ = _ort_runners(bundle, m)

    @contextlib.contextmanager
    def open_engine(fl, plan_path, graph):
        assert os.path.isfile(plan_path)  # the plan the build just wrote, not yet in the bundle
        run = run_llm if graph == "llm" else run_fc
        yield (lambda *a: run(*a) * (1 + damage)), 0

    return open_engine


@pytest.mark.parametrize("damage", [0.0, 0.2])
def test_build_adds_an_engine_the_gate_accepts_and_refuses_one_over_it(small_bundle, tmp_path, monkeypatch, damage):
    from timecma.runtime.compile import tensorrt
    from timecma.runtime.compile.cli import engines_cmd

    b = _copy(small_bundle, tmp_path)
    m = read_manifest(b)
    before = _snapshot(b)
    _gpu_here(monkeypatch, "89")
    monkeypatch.setattr(tensorrt, "open_engine", _supplied_outputs(b, m, damage))
    r = CliRunner().invoke(engines_cmd, ["build", str(b), "--precision", "fp32", "--graph", "llm",
                                         "--trt-flavour", "rtx", "--max-batch", "2", "--max-seq", "128"])
    m2 = read_manifest(b)
    if damage:
        assert r.exit_code == 3 and "refused by the gate on this GPU, not added to the bundle: llm fp32" in r.output
        assert "REFUSED (worst prompt embedding" in r.output
        assert _snapshot(b) == before and m2.engines == m.engines
    else:
        assert r.exit_code == 0, (r.output, r.exception)
        new = [e for e in m2.engines if e.precision == "fp32"]
        assert len(new) == 1 and new[0].info[PARITY_KEY]["accepted"] and new[0].info[PARITY_KEY]["gpu"] == "sm89"
        assert new[0].info[PARITY_KEY]["batch_sizes"] == [1, 2] and "accepted (worst prompt embedding" in r.output
        from timecma.runtime.backends.tensorrt import gate_state

        assert gate_state(new[0], "89") == "accepted here"


def _build_forecaster_fp32(b, **kw):
    from timecma.runtime.compile.tensorrt import EngineProfile, build_engines

    return build_engines(str(b), ("fp32",), "rtx", EngineProfile(forecast_batch=(1, 1, 4)), graphs=("forecaster",),
                         **kw)


SMALL = {"llm_batch": (1, 2, 2), "llm_seq": (1, 64, 128), "forecast_batch": (1, 1, 4)}  # quick to build


def _without_gate_windows(b):
    """A bundle as an older timecma exported it: no ``parity/gate.npz`` (nor its manifest record)."""
    import json

    (b / "parity" / "gate.npz").unlink()
    raw = json.loads((b / "manifest.json").read_text())
    raw["files"].pop("parity/gate.npz", None)
    (b / "manifest.json").write_text(json.dumps(raw))


def test_a_build_on_a_gpu_refuses_an_engine_it_cannot_gate(small_bundle, tmp_path, monkeypatch):
    """A GPU the engine targets is here (its capability supplied) but the bundle has no gate windows: the engine
    is refused, saying to re-export, and the bundle is left as it was; never committed ungated."""
    from timecma.runtime.compile import tensorrt
    from timecma.runtime.compile.cli import engines_cmd

    b = _copy(small_bundle, tmp_path)
    _without_gate_windows(b)
    before = _snapshot(b)
    _gpu_here(monkeypatch, "89")

    @contextlib.contextmanager
    def no_engine_runs(fl, plan_path, graph):  # the gate must refuse before any engine would be loaded
        raise AssertionError("an engine was run without gate windows")
        yield

    monkeypatch.setattr(tensorrt, "open_engine", no_engine_runs)
    built = _build_forecaster_fp32(b)
    assert list(built) == [] and len(built.refused) == 1
    rec = built.refused[0].info[PARITY_KEY]
    assert rec["accepted"] is False and rec["gpu"] == "sm89"
    assert "re-export the bundle to get gate windows" in tensorrt.parity_summary(rec)
    assert _snapshot(b) == before
    r = CliRunner().invoke(engines_cmd, ["build", str(b), "--precision", "fp32", "--graph", "forecaster",
                                         "--trt-flavour", "rtx", "--max-batch", "4"])
    assert r.exit_code == 3 and "re-export the bundle to get gate windows" in r.output, r.output
    assert _snapshot(b) == before


def test_a_build_without_a_gpu_adds_an_engine_as_not_measured_even_without_gate_windows(small_bundle, tmp_path,
                                                                                         monkeypatch):
    b = _copy(small_bundle, tmp_path)
    _without_gate_windows(b)
    _gpu_here(monkeypatch, None)
    (e,) = _build_forecaster_fp32(b)
    assert "no CUDA GPU" in e.info[PARITY_KEY]["not_measured"]


def test_one_gate_reference_for_engines_and_openvino_variants():
    """TensorRT's gate and OpenVINO's load the gate windows and compute the fp32 reference in one class."""
    from timecma.runtime.compile import openvino, tensorrt
    from timecma.runtime.compile.gate import GateReference

    assert issubclass(tensorrt.EngineGate, GateReference) and not hasattr(tensorrt, "engine_verdict")
    tree = ast.parse((REPO / "runtime/compile/openvino.py").read_text())
    (fn,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "build_openvino"]
    assert "GateReference" in {n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call)
                               and isinstance(n.func, ast.Name)}
    for mod in (openvino, tensorrt):
        src = (REPO / "runtime/compile" / f"{mod.__name__.rsplit('.', 1)[1]}.py").read_text()
        assert "ort_session(" not in src, f"{mod.__name__} computes a reference of its own"


def test_rebuilding_an_engine_replaces_its_plan_atomically(small_bundle, tmp_path, monkeypatch):
    """The same slot and profile again: the plan's name never stops holding a whole plan (os.replace over the
    old file, nothing deleted first), and nothing is left beside it."""
    b = _copy(small_bundle, tmp_path)
    first = _build_forecaster_fp32(b)[0]
    plan = b / first.file
    seen = []
    real_replace = os.replace

    def watching_replace(src, dst, *a, **kw):
        if os.fspath(dst) == str(plan):
            seen.append(os.path.exists(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", watching_replace)
    second = _build_forecaster_fp32(b)[0]
    assert second.file == first.file and seen == [True]
    m = read_manifest(b)  # verifies every file
    assert [e.sha256 for e in m.engines if e.file == first.file] == [m.sha256(first.file)]
    assert sorted(os.listdir(b / "engines")) == sorted(
        [".lock"] + [os.path.basename(e.file) for e in m.engines])


def test_a_failed_commit_puts_back_the_plan_the_old_manifest_lists(small_bundle, tmp_path, monkeypatch):
    """The manifest cannot be written (disk full) while a plan of the same name is being replaced: the bundle
    is left as it was, its old plan included; the rollback removes only what this attempt created."""
    from timecma.runtime.compile import tensorrt

    b = _copy(small_bundle, tmp_path)
    _build_forecaster_fp32(b)
    before = _snapshot(b)

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensorrt, "write_manifest", full_disk)
    with pytest.raises(OSError, match="No space left"):
        tensorrt.build_engines(str(b), ("fp32",), "rtx", tensorrt.EngineProfile(**SMALL))  # llm: new; forecaster: same name
    read_manifest(b)  # every listed file present and matching its hash
    assert _snapshot(b) == before


# --- make gpu-check, step by step ---------------------------------------------------------------------------------
def _script_commands(tool: str, bundle) -> list[list[str]]:
    """The arguments of each `"$BIN/<tool>"` line of benchmarks/gpu_check.sh, as the script passes them."""
    out = []
    text = GPU_CHECK.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if f'"$BIN/{tool}"' not in line:
            continue
        words = shlex.split(line.split("|")[0].split("2>&1")[0])
        args = [w.replace("$BUNDLE", str(bundle)).replace("${TRT_FLAVOUR:-auto}", "auto") for w in words[1:]]
        out.append(args)
    return out


def test_gpu_check_engine_steps_run_to_their_first_cuda_call(small_bundle, tmp_path, monkeypatch):
    """The script's `timecma-engines build` and `verify` lines, as written, with an sm89 GPU supplied: the
    build compiles its engines and stops at the gate's first CUDA call (no GPU is here), leaving the bundle
    unchanged; verify then finds the bundle's engines can run, the line the script greps for the benchmark."""
    from timecma.runtime.compile.cli import engines_cmd

    b = _copy(small_bundle, tmp_path)
    commands = _script_commands("timecma-engines", b)
    assert [c[0] for c in commands] == ["build", "verify"]
    _gpu_here(monkeypatch, "89")
    before = _snapshot(b)
    r = CliRunner().invoke(engines_cmd, commands[0])
    assert r.exit_code == 4 and re.search(FIRST_CUDA_CALL, r.output) and "(bundle unchanged)" in r.output, r.output
    assert _snapshot(b) == before
    r = CliRunner().invoke(engines_cmd, commands[1])
    assert r.exit_code == 0, (r.output, r.exception)
    grep = GPU_CHECK.read_text().split('grep -q "')[1].split('"')[0]
    assert grep in r.output  # the benchmark would include tensorrt


def _run_gpu_check(tmp_path, nvidia_smi: str, bundle) -> subprocess.CompletedProcess:
    """benchmarks/gpu_check.sh from a copy of the repo's layout in tmp_path (it cds to its parent's parent, where
    it would write results), with an `nvidia-smi` supplied on PATH and the venv used as it is."""
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    shutil.copy(GPU_CHECK, root / "benchmarks" / "gpu_check.sh")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    import sys

    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHON": sys.executable, "GPU_INSTALL": "skip",
           "BUNDLE": str(bundle)}
    return subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, cwd=root, check=False)


def test_gpu_check_stops_at_its_first_cuda_call_when_only_nvidia_smi_sees_a_gpu(small_bundle, tmp_path):
    r = _run_gpu_check(tmp_path, 'echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"', small_bundle)
    assert r.returncode == 1 and "GPU_INSTALL=skip" in r.stderr
    assert "nvidia-smi sees a GPU but the CUDA runtime does not" in r.stderr, r.stderr
    assert not (tmp_path / "repo" / "benchmarks" / "results").exists()  # nothing written before the CUDA check


def test_gpu_check_exits_3_without_a_gpu(small_bundle, tmp_path):
    r = _run_gpu_check(tmp_path, "exit 9", small_bundle)
    assert r.returncode == 3 and "no NVIDIA GPU or driver here" in r.stderr


# --- one decision for every variant (timecma.core.accuracy.judge_variant) ------------------------------------------
GATED = {"runtime/compile/tensorrt.py": "judge", "runtime/compile/openvino.py": "build_openvino",
         "export/cpu_variants.py": "_quantized_variant"}
GATE_NAMES = {"EMBEDDING_GATE", "FORECAST_GATE", "MSE_GATE", "GATE", "gate"}


@pytest.mark.parametrize("path, function", sorted(GATED.items()))
def test_every_variant_gate_takes_the_one_decision(path, function):
    """TensorRT engines, OpenVINO variants and export's ONNX Runtime int8 graphs each compared their own figures
    with the shared thresholds; now each calls ``judge_variant`` and compares nothing with a gate itself."""
    tree = ast.parse((REPO / path).read_text())
    (fn,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
    calls = {n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "judge_variant" in calls
    own = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Compare)
           and any(isinstance(x, ast.Name) and x.id in GATE_NAMES for x in [n.left, *n.comparators])]
    assert not own, f"{path} decides against a gate itself: {own}"


def test_judge_variant_thresholds_and_figures():
    from timecma.core.accuracy import EMBEDDING_GATE, FORECAST_GATE, MSE_GATE, judge_variant

    y_ref, truth, mean, std, emb_ref = _case()
    v = judge_variant(y_ref, y_ref, truth, mean, std, emb_ref, emb_ref)
    assert v["accepted"] and v["finite"] and (v["mse_gate"], v["forecast_gate"]) == (MSE_GATE, FORECAST_GATE)
    # one value moved past the forecast gate: refused, unless that rule is off (export's ORT int8 gate)
    y = y_ref.copy()
    y[1, 2, 0] += 0.05 * std[0]
    assert not judge_variant(y, y_ref, truth, mean, std)["accepted"]
    loose = judge_variant(y, y_ref, truth, mean, std, forecast_gate=None)
    assert loose["accepted"] and loose["forecast_max_abs_change_normalized"] == pytest.approx(0.05, rel=1e-3)
    # the MSE gate is relative: a change of 2% is refused at 1%, accepted at 5%
    scale = np.sqrt(1.02)
    y_far = (mean + (((y_ref - mean) / std - truth) * scale + truth) * std).astype(np.float64)
    v = judge_variant(y_far, y_ref, truth, mean, std, forecast_gate=None)
    assert v["mse_rel_change"] == pytest.approx(0.02, rel=1e-4) and not v["accepted"]
    assert judge_variant(y_far, y_ref, truth, mean, std, mse_gate=0.05, forecast_gate=None)["accepted"]
    # the embedding gate: the worst prompt decides
    emb = emb_ref.copy()
    emb[3] *= 1 + 2 * EMBEDDING_GATE
    v = judge_variant(y_ref, y_ref, truth, mean, std, emb, emb_ref)
    assert not v["accepted"] and v["embedding"]["prompt_rel_l2_max"] == pytest.approx(2 * EMBEDDING_GATE, rel=1e-4)


@pytest.mark.parametrize("where", ["forecast", "embedding", "reference"])
def test_judge_variant_refuses_whatever_is_not_finite(where):
    """Non-finite outputs are refused by an explicit rule, with ``finite`` False and inf figures in the record,
    whichever gates apply (the ORT int8 gate has no forecast rule), not by the accident of a NaN comparison;
    a non-finite reference is refused too."""
    from timecma.core.accuracy import judge_variant

    y_ref, truth, mean, std, emb_ref = _case()
    y, emb, ref = y_ref.copy(), emb_ref.copy(), y_ref.copy()
    if where == "forecast":
        y[0, 0, 0] = ref[0, 0, 0] = np.inf
    elif where == "embedding":
        emb[2, 5] = np.nan
    else:
        ref[1, 1, 1] = np.nan
    for forecast_gate in (0.01, None):
        v = judge_variant(y, ref, truth, mean, std, emb, emb_ref, forecast_gate=forecast_gate)
        assert not v["accepted"] and v["finite"] == (where == "reference")
    if where == "embedding":
        assert v["embedding"]["prompt_rel_l2_max"] == np.inf and v["embedding"]["prompts"] == len(emb)


# --- `timecma-engines build` replaces nothing it did not make ------------------------------------------------------
def _plan_name(b, m, graph: str, precision: str, forecast_batch=(1, 1, 4)) -> str:
    """The name `timecma-engines build --trt-flavour rtx` gives the plan of ``graph`` here (no GPU: portable)."""
    from timecma.runtime.compile.tensorrt import EngineProfile, engine_file_name

    fl = load_flavour("rtx")
    targets, _ = fl.build_targets(None, None)
    shapes = EngineProfile(forecast_batch=forecast_batch).shapes(graph, m.model_config)
    onnx_file = m.graphs[graph].files[precision].file
    return engine_file_name(graph, precision, fl, targets, m.sha256(onnx_file), shapes)


def test_engines_build_refuses_a_file_it_did_not_make_under_a_plan_name(small_bundle, tmp_path):
    """A plan was moved in with os.replace over whatever held its name in engines/."""
    from timecma.runtime.compile.cli import engines_cmd

    b = _copy(small_bundle, tmp_path)
    m = read_manifest(b)
    user = b / "engines" / _plan_name(b, m, "forecaster", "fp32")
    user.write_text("not yours")
    before = _snapshot(b)
    r = CliRunner().invoke(engines_cmd, ["build", str(b), "--precision", "fp32", "--graph", "forecaster",
                                         "--trt-flavour", "rtx", "--forecast-batch", "1,1,4"])
    assert r.exit_code == 2 and str(user) in r.output and "refusing to replace it" in r.output, r.output
    assert user.read_text() == "not yours" and _snapshot(b) == before
    assert read_manifest(b).engines == m.engines
    # and where the build finds its name free it commits, but the rule is checked again at commit time
    from timecma.core.errors import InputError
    from timecma.runtime.compile import tensorrt

    user.unlink()
    tmp = b / "engines" / ".build-x"
    tmp.mkdir()
    (tmp / user.name).write_bytes(b"plan")
    entry = dataclasses.replace(m.engines[0], file=f"engines/{user.name}")
    user.write_text("not yours")  # appeared while the build ran
    with pytest.raises(InputError, match=re.escape(str(user))):
        tensorrt._commit(str(b), m, str(tmp), [entry])
    assert user.read_text() == "not yours" and (tmp / user.name).read_bytes() == b"plan"


def test_rebuilding_a_slot_removes_only_engine_plans(small_bundle, tmp_path):
    """A manifest whose engine entry names a file that is no plan (here the forecaster's own ONNX graph, hash and
    all): rebuilding that slot dropped the entry's file from the bundle. Now the entry goes, the file stays."""
    from timecma.core.manifest import write_manifest

    b = _copy(small_bundle, tmp_path)
    m = read_manifest(b)
    graph_file = m.graphs["forecaster"].files["fp32"].file
    like = next(e for e in m.engines if e.flavour == "tensorrt_rtx")
    odd = dataclasses.replace(like, graph="forecaster", precision="fp32", file=graph_file,
                              sha256=m.sha256(graph_file), bytes=os.path.getsize(b / graph_file))
    write_manifest(str(b), dataclasses.replace(m, engines=[*m.engines, odd]))
    graph_bytes = (b / graph_file).read_bytes()
    new = _build_forecaster_fp32(b)
    m2 = read_manifest(b)  # verifies every file: the graph is still there and listed
    assert (b / graph_file).read_bytes() == graph_bytes and graph_file in m2.files
    assert [e.file for e in m2.engines if e.precision == "fp32"] == [new[0].file]
