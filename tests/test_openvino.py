"""The OpenVINO backend: fp32 parity with ort-cpu, lower precisions within the gate export recorded, a gate that
refuses a damaged variant (and `auto` that does not use it), and a clear refusal where OpenVINO is missing."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_frame

ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'timecma[openvino]')")

from timecma.core.manifest import read_manifest  # noqa: E402
from timecma.core.machine import has_native_bf16 as cpu_has_bf16  # noqa: E402
from timecma.runtime.backends.openvino import OpenVinoBackend, choose  # noqa: E402
from timecma.runtime.compile.openvino import GATE_FILE, build_openvino, disjoint_windows, scored_windows  # noqa: E402
from timecma.runtime import Forecaster  # noqa: E402

VARS = ["v0", "v1", "v2"]


def _forecaster(bundle, precision) -> Forecaster:
    m = read_manifest(str(bundle))
    return Forecaster(str(bundle), m, OpenVinoBackend(str(bundle), m, precision=precision), None)


def test_export_gated_every_variant_this_cpu_has(small_bundle):
    m = read_manifest(str(small_bundle))
    got = {(v.graph, v.precision) for v in m.openvino}
    want = {(g, p) for g in ("llm", "forecaster") for p in ("f32", "int8") + (("bf16",) if cpu_has_bf16() else ())}
    assert got == want | {("llm", "w8a8")}
    for v in m.openvino:
        emb_ok = "embedding" not in v.info or v.info["embedding"]["prompt_rel_l2_max"] < v.info["embedding"]["gate"]
        moved_ok = v.info["max_abs_change_normalized"] < v.info["forecast_gate"] == 0.01
        assert v.accepted == (v.mse_rel_change < 0.01 and emb_ok and moved_ok) and v.info["windows"] > 0 and v.ms > 0
        assert v.file is None or (v.file in m.files and os.path.isfile(small_bundle / v.file))
    assert GATE_FILE in m.files


def test_f32_matches_ort_cpu(small_bundle):
    win = make_frame(200, seed=6).iloc[50:74]
    ref = Forecaster.load(str(small_bundle), backend="ort-cpu").predict(win)
    got = _forecaster(small_bundle, "f32").predict(win)
    scale = make_frame(500)[VARS].to_numpy().std(axis=0)
    assert (np.abs(got - ref) / scale).max() <= 1e-4


def test_split_forecaster_with_a_store_matches_ort_cpu_and_only_in_f32(small_bundle, tmp_path):
    """The split graphs (prompt encoder + head) on OpenVINO f32 serve a window and its repeat like ONNX Runtime's;
    a forced lower-precision forecaster runs the whole graph (the split graphs are f32)."""
    m = read_manifest(str(small_bundle))
    win = make_frame(200, seed=8).iloc[30:54]
    ort_cpu = Forecaster.load(str(small_bundle), backend="ort-cpu")
    ref = ort_cpu.predict(win)
    f = Forecaster.load(str(small_bundle), backend="openvino", store=str(tmp_path / "s"),
                        precision={"llm": "f32", "forecaster": "f32"})
    assert f.backend.split == ort_cpu.backend.split
    scale = make_frame(500)[VARS].to_numpy().std(axis=0)
    assert (np.abs(f.predict(win) - ref) / scale).max() <= 1e-4
    assert (np.abs(f.predict(win) - ref) / scale).max() <= 1e-4 and f.stats.window_hits == 1
    f.close()
    assert OpenVinoBackend(str(small_bundle), m, precision={"llm": "f32", "forecaster": "int8"}).split is None


@pytest.mark.parametrize("precision", ["bf16", "int8", "w8a8"])
def test_lower_precision_stays_within_its_recorded_gate(small_bundle, precision):
    """Recompute the gate's validation MSE through the serving path: it is what the manifest says."""
    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16 (no avx512_bf16 / amx_bf16): bf16 is not gated or used here")
    m = read_manifest(str(small_bundle))
    g = np.load(small_bundle / GATE_FILE)
    n = m.model_config.num_nodes
    ref_be = Forecaster.load(str(small_bundle), backend="ort-cpu").backend
    be = OpenVinoBackend(str(small_bundle), m, precision=precision if precision != "w8a8" else
                         {"llm": precision, "forecaster": "f32"})
    ys = {}
    for name, b in (("ref", ref_be), ("low", be)):
        emb = np.stack([b.run_llm(g["llm_input_ids"][i * n:(i + 1) * n], g["llm_attention_mask"][i * n:(i + 1) * n])
                        for i in range(len(g["x"]))])
        ys[name] = np.concatenate([b.run_forecaster(g["x"][i:i + 1], emb[i:i + 1]) for i in range(len(g["x"]))])
    mse = {k: float(np.mean(((y - g["mean"]) / g["std"] - g["truth"]) ** 2)) for k, y in ys.items()}
    change = abs(mse["low"] - mse["ref"]) / mse["ref"]
    recorded = [v for v in m.openvino if v.precision == precision]
    # both graphs lowered at once: bounded by the sum of the two per-graph changes (plus float noise)
    assert change <= sum(v.mse_rel_change for v in recorded) + 1e-3


def test_w8a8_quantises_activations_and_records_its_calibration(small_bundle):
    """Static int8: the IR holds activation quantisers (not only int8 weights), the attention's activation x
    activation MatMuls stay float, and the record says how it was calibrated."""
    m = read_manifest(str(small_bundle))
    (v,) = [v for v in m.openvino if v.graph == "llm" and v.precision == "w8a8"]
    ops = ov.Core().read_model(str(small_bundle / v.file)).get_ordered_ops()
    act_quantisers = [op for op in ops if op.get_type_name() == "FakeQuantize"
                      and op.input_value(0).get_node().get_type_name() not in ("Constant", "Convert")]
    assert len(act_quantisers) > 0
    windows = len(np.load(small_bundle / GATE_FILE)["x"])
    assert v.info["calibration_prompts"] == min(4, (windows + 1) // 2) * m.model_config.num_nodes
    assert v.info["float_activation_matmuls"] > 0 and "embedding" in v.info
    keep, said = scored_windows(np.load(small_bundle / GATE_FILE)["starts"],
                                m.model_config.seq_len + m.model_config.pred_len)
    assert v.info["windows"] == len(keep) and v.info["scored_on"] == said


def test_calibrated_variants_are_scored_on_windows_apart_from_their_calibration():
    """Gate windows lie closer together than a window's span: a calibration window's neighbours share time steps
    with it and are not scored either; where no window is apart, all are scored and the record says so."""
    starts = np.arange(0, 32 * 87, 87)  # 32 gate windows over ETTh1's validation rows, 96 + 96 steps each
    keep, said = scored_windows(starts, 192)
    calibrated = starts[[0, 2, 4, 6]]
    assert keep.tolist() == list(range(9, 32))  # window 8 starts 174 steps after window 6: it overlaps
    assert all(np.abs(starts[k] - calibrated).min() >= 192 for k in keep) and "(23 of 32)" in said
    keep, said = disjoint_windows(np.array([0, 10, 20]), np.array([5]), 96)
    assert keep.tolist() == [0, 1, 2] and "overlapping" in said


def test_gate_refuses_a_damaged_variant_and_auto_skips_it(small_bundle, tmp_path, caplog):
    import onnx
    from onnx import numpy_helper

    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    m = read_manifest(str(bundle))
    model = onnx.load(str(bundle / m.graphs["forecaster"].files["fp32"].file))
    for w in model.graph.initializer:  # every weight matrix doubled: a broken variant
        a = numpy_helper.to_array(w)
        if a.ndim >= 2 and a.dtype == np.float32:
            w.CopyFrom(numpy_helper.from_array(a * 2.0, w.name))
    os.makedirs(bundle / "openvino", exist_ok=True)
    onnx.save(model, str(bundle / "openvino" / "forecaster.damaged.onnx"))
    (v,) = build_openvino(str(bundle), precisions=(),
                          candidates={("forecaster", "damaged"): "openvino/forecaster.damaged.onnx"})
    assert not v.accepted and v.mse_rel_change >= 0.01
    m = read_manifest(str(bundle))
    assert any(x.precision == "damaged" and not x.accepted for x in m.openvino)
    with caplog.at_level(logging.INFO, logger="timecma"):
        assert choose(m, "forecaster", "auto")[0] != "damaged"
    assert "openvino forecaster: not damaged: refused by its gate: REFUSED (validation MSE" in caplog.text
    assert "openvino forecaster: auto runs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="timecma"):
        be = OpenVinoBackend(str(bundle), m, precision={"llm": "f32", "forecaster": "damaged"})
    assert be.precision["forecaster"] == "damaged" and "failed its accuracy gate" in caplog.text


def test_missing_openvino_is_a_clear_refusal(small_bundle, tmp_path):
    code = ("import sys\nsys.modules['openvino'] = None\n"
            "from timecma.runtime import available_backends, make_backend\n"
            "from timecma.core.manifest import read_manifest\n"
            "print(available_backends()['openvino'])\n"
            f"make_backend('openvino', {str(small_bundle)!r}, read_manifest({str(small_bundle)!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "openvino not installed (pip install 'timecma[openvino]')" in r.stdout
    assert r.returncode != 0 and "BackendUnavailable" in r.stderr and "not usable here" in r.stderr
    import pyarrow as pa
    import pyarrow.parquet as pq

    inp = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pandas(make_frame(60), preserve_index=False), inp)
    r = subprocess.run([sys.executable, "-c", "import sys\nsys.modules['openvino'] = None\n"
                        "from timecma.runtime.serving.batch_cli import serve_batch_cmd\nserve_batch_cmd()", str(inp),
                        "--bundle", str(small_bundle), "--backend", "openvino", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 4 and "pip install 'timecma[openvino]'" in r.stderr, r.stderr
    assert not (tmp_path / "in.forecasts.parquet").exists()


def test_no_progress_bars_off_a_terminal(small_bundle, tmp_path):
    """NNCF's rich bars ("Applying Weight Compression ━━━") are for terminals: a piped run prints none."""
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    r = subprocess.run([sys.executable, "-c", "from timecma.runtime.compile.cli import engines_cmd; engines_cmd()",
                        "openvino", str(bundle), "--precision", "int8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "int8" in r.stdout
    assert "━" not in r.stdout + r.stderr and "Weight Compression" not in r.stdout + r.stderr, r.stdout


def test_llm_variants_are_judged_by_their_embeddings(small_bundle, tmp_path):
    """The LLM stage's gate reads each validation prompt's embedding error, not only the forecast MSE
    (which a forecaster's own error can hide): recorded for every LLM variant, and a damaged one fails it."""
    import onnx
    from onnx import numpy_helper

    from timecma.core.accuracy import EMBEDDING_GATE

    m = read_manifest(str(small_bundle))
    for v in (v for v in m.openvino if v.graph == "llm"):
        assert v.info["embedding"]["gate"] == EMBEDDING_GATE and v.info["embedding"]["prompts"] > 0
        assert v.accepted == (v.mse_rel_change < 0.01 and v.info["embedding"]["prompt_rel_l2_max"] < EMBEDDING_GATE)
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    model = onnx.load(str(bundle / m.graphs["llm"].files["fp32"].file))
    for w in model.graph.initializer:  # the MLP weights scaled: the same graph, other embeddings
        a = numpy_helper.to_array(w)
        if a.ndim == 2 and a.dtype == np.float32 and "mlp" in w.name:
            w.CopyFrom(numpy_helper.from_array(a * 1.5, w.name))
    os.makedirs(bundle / "openvino", exist_ok=True)
    onnx.save(model, str(bundle / "openvino" / "llm.damaged.onnx"))
    (v,) = build_openvino(str(bundle), precisions=(), candidates={("llm", "damaged"): "openvino/llm.damaged.onnx"})
    assert v.info["embedding"]["prompt_rel_l2_max"] >= EMBEDDING_GATE and not v.accepted


def test_a_graph_rewritten_at_the_same_path_is_compiled_afresh(tmp_path):
    """OpenVINO's own cache keys a file by its path: a re-exported graph must not load the old one's blob."""
    import onnx
    from onnx import TensorProto, helper

    from timecma.runtime.backends.openvino import graph_runner

    def write(op: str, path) -> None:
        c = helper.make_tensor("c", TensorProto.FLOAT, [1], [3.0])
        g = helper.make_graph([helper.make_node(op, ["x", "c"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [c])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    path = tmp_path / "graph.onnx"
    x = {"x": np.array([2.0], dtype=np.float32)}
    write("Add", path)
    assert graph_runner(str(path), "f32")(x)[0] == 5.0
    write("Mul", path)
    assert graph_runner(str(path), "f32")(x)[0] == 6.0


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16: OpenVINO runs a bf16 hint in f32")
def test_bf16_after_f32_of_the_same_graph_is_compiled_in_bf16(tmp_path):
    """OpenVINO's cache does not key a file by its precision hint: a bf16 compile after an f32 one of the same
    graph loaded the f32-compiled blob, whose Llama rotary ran in bf16 without the bf16 pipeline's f32 guards
    (SmolLM2: 35% instead of 1%). Our compile must give exactly what an uncached bf16 compile gives."""
    from timecma.export.onnx_export import export_llm
    from timecma.llm import build_tiny_llm, load_llm
    from timecma.runtime.backends.openvino import compile_graph, graph_runner

    llm = load_llm(build_tiny_llm(tmp_path / "llama", arch="llama"))
    path = str(tmp_path / "llm.onnx")
    export_llm(llm.encoder, path, llm.info.max_positions)
    rng = np.random.default_rng(0)  # long prompts: rotary angles at positions in the hundreds are what bf16 hurts
    feeds = {"input_ids": rng.integers(5, 500, (3, 440)), "attention_mask": np.ones((3, 440), np.int64)}
    f32 = graph_runner(path, "f32")(feeds)
    bf16 = graph_runner(path, "bf16")(feeds)
    uncached = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"}).create_infer_request()
    uncached.infer(feeds)
    assert np.array_equal(bf16, uncached.get_output_tensor(0).data)
    assert not np.array_equal(bf16, f32)
    assert compile_graph(path, "bf16").get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16



def test_a_variant_with_non_finite_outputs_is_refused_and_recorded(small_bundle, tmp_path):
    """A forecaster that returns NaN: refused by the one decision every variant takes, its record saying why
    (``finite`` False, inf figures), and the manifest with those figures still reads back."""
    import onnx
    from onnx import numpy_helper

    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    m = read_manifest(str(bundle))
    model = onnx.load(str(bundle / m.graphs["forecaster"].files["fp32"].file))
    for w in model.graph.initializer:  # every weight matrix NaN: a variant whose outputs are all NaN
        a = numpy_helper.to_array(w)
        if a.ndim >= 2 and a.dtype == np.float32:
            w.CopyFrom(numpy_helper.from_array(np.full_like(a, np.nan), w.name))
    os.makedirs(bundle / "openvino", exist_ok=True)
    onnx.save(model, str(bundle / "openvino" / "forecaster.nan.onnx"))
    (v,) = build_openvino(str(bundle), precisions=(), candidates={("forecaster", "nan"): "openvino/forecaster.nan.onnx"})
    assert not v.accepted and v.info["finite"] is False
    assert v.mse_rel_change == np.inf and v.info["max_abs_change_normalized"] == np.inf
    (r,) = [x for x in read_manifest(str(bundle)).openvino if x.precision == "nan"]
    assert not r.accepted and r.info["finite"] is False and r.mse_rel_change == np.inf
