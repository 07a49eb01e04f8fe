"""timecma-bench runs on a tiny model, writes its three files, and its parity column means something."""

import json

import pytest

from conftest import run_cli


def test_bench_runs_and_parity_is_computed(small_bundle, small_run, tmp_path):
    out = tmp_path / "bench"
    r = run_cli("timecma.benchmarks.cli:bench_cmd", "--bundle", str(small_bundle), "--data", str(small_run[0]),
                "--backends",
                "torch,ort-cpu,ort-cpu:fp16,tensorrt", "--n-vars", "2,5", "--prompt-tokens", "16",
                "--hit-iters", "5", "--miss-iters", "3", "--sweep-iters", "2", "--precompute-prompts", "12",
                "--precompute-batch", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# timecma-bench") and (out / "latency.png").stat().st_size > 0
    assert res["reference"] == "torch" and "skipped" in res["backends"]["tensorrt"]  # reported, not faked
    cpu, fp16 = res["backends"]["ort-cpu"], res["backends"]["ort-cpu:fp16"]
    for b in (cpu, fp16):
        assert b["miss"]["end_to_end_ms"]["n"] == 3 and b["hit"]["stages_ms"]["llm"]["p50"] == 0.0
        assert b["miss"]["stages_ms"]["llm"]["p50"] > 0
        # a new window with stored prompts renders them and runs no LLM; a window served before renders nothing
        assert b["prompt-hit"]["stages_ms"]["llm"]["p50"] == 0.0 and b["prompt-hit"]["stages_ms"]["render"]["p50"] > 0
        assert b["hit"]["stages_ms"]["render"]["p50"] == 0.0
    assert res["backends"]["torch"]["hit"]["stages_ms"]["render"]["p50"] > 0  # the reference runs the forecaster whole
    # fp32 ONNX matches eager torch closely; the fp16 LLM graph measurably does not (the column is live)
    assert cpu["parity_vs_reference"]["max_abs_over_series_std"] < 1e-4
    assert fp16["parity_vs_reference"]["max_abs_over_series_std"] > cpu["parity_vs_reference"]["max_abs_over_series_std"]
    assert fp16["llm_graph"] == "fp16"
    sweep = {(s["backend"], s["n_vars"]) for s in res["sweep"]}
    assert {("torch", 2), ("torch", 5), ("ort-cpu", 2), ("ort-cpu", 5)} <= sweep
    # the anchors measured in this run, and the fastest PyTorch row of each kind (here the one torch row)
    assert set(cpu["speedup_vs"]) == {"torch", "fastest-torch"} and set(res["fastest_torch"].values()) == {"torch"}
    assert cpu["speedup_vs"]["fastest-torch"] == cpu["speedup_vs"]["torch"]
    assert "speed-up vs fastest PyTorch row" in (out / "results.md").read_text()
    pc = res["precompute"]
    # reference loop, eager fp32 plain and last-position, eager bf16, then ORT and OpenVINO f32/bf16/int8 graphs
    assert pc["prompts"] == 12 and len(pc["modes"]) == 8
    calls = [m["llm_calls"] for m in pc["modes"].values() if "llm_calls" in m]
    assert calls[0] == 12 and all(3 <= c == calls[1] < 12 for c in calls[1:])  # one at a time vs batches of <= 4
    ort = next(m for name, m in pc["modes"].items() if name.startswith("ort-cpu"))
    assert ort["embedding_rel_l2_max"] < 1e-5 and ort["store_precision"] == "fp32"  # the exported graph, fp32
    assert "Embedding precompute throughput" in (out / "results.md").read_text()


def test_bench_rejects_bad_sweep_values(small_bundle, tmp_path):
    r = run_cli("timecma.benchmarks.cli:bench_cmd", "--bundle", str(small_bundle), "--n-vars", "7,x")
    assert r.returncode == 2 and "comma-separated integers" in r.stderr


def test_bench_takes_the_checkpoint_from_the_command_line(small_bundle, small_run, tmp_path):
    """A bundle exported to another folder: the torch rows need --ckpt, and the skip says so."""
    import shutil

    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(small_bundle, moved)
    args = ["--bundle", str(moved), "--data", str(small_run[0]), "--backends", "torch,ort-cpu", "--n-vars", "2",
            "--prompt-tokens", "16", "--hit-iters", "3", "--miss-iters", "2", "--sweep-iters", "1"]
    r = run_cli("timecma.benchmarks.cli:bench_cmd", *args, "--out", str(tmp_path / "without"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "without" / "results.json").read_text())
    assert "--ckpt" in res["backends"]["torch"]["skipped"]
    r = run_cli("timecma.benchmarks.cli:bench_cmd", *args, "--ckpt", str(small_run[1] / "best.pt"),
                "--out", str(tmp_path / "with"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "with" / "results.json").read_text())
    assert "skipped" not in res["backends"]["torch"] and res["reference"] == "torch"
    assert res["backends"]["ort-cpu"]["parity_vs_reference"]["max_abs_over_series_std"] < 1e-4


def test_torch_anchor_specs():
    from timecma.benchmarks.harness import parse_backend

    assert parse_backend("torch-bf16") == ("torch", {"dtype": "bfloat16"})
    assert parse_backend("torch-compile") == ("torch", {"dtype": "float32", "compile": True})
    assert parse_backend("torch-compile-bf16") == ("torch", {"dtype": "bfloat16", "compile": True})
    with pytest.raises(ValueError, match="unknown torch backend 'torch-fp8'"):
        parse_backend("torch-fp8")


def test_bf16_anchors_are_skipped_with_the_reason_where_bf16_is_emulated_unless_asked(small_bundle, monkeypatch):
    """Without native bf16 an eager bf16 row of a GPT-2-size bundle takes an hour (emulated, ~100x fp32): the
    default run skips it, saying why and how to force it; --emulated-bf16 runs it; native bf16 runs it."""
    from timecma.benchmarks import harness
    from timecma.core.errors import BackendUnavailable
    from timecma.core.manifest import read_manifest

    m = read_manifest(str(small_bundle))
    cfg = harness.BenchConfig(bundle=str(small_bundle), backends=["torch", "torch-bf16"])
    monkeypatch.setattr(harness, "has_native_bf16", lambda: False)  # this machine's answer varies by CPU
    with pytest.raises(BackendUnavailable, match=r"no native bf16.*--emulated-bf16"):
        harness.open_backend("torch-compile-bf16", cfg, m)
    assert harness.open_backend("torch", cfg, m).name == "torch"  # fp32 rows are never held back
    cfg.emulated_bf16 = True
    assert harness.open_backend("torch-bf16", cfg, m).llm_precision.endswith("bf16")
    monkeypatch.setattr(harness, "has_native_bf16", lambda: True)
    cfg.emulated_bf16 = False
    assert harness.open_backend("torch-bf16", cfg, m).name == "torch-bf16"


def test_torch_compile_backend_matches_eager(small_bundle):
    """The torch.compile anchor computes what eager fp32 computes (fp32 tolerance: 1e-4 of the output's scale)."""
    import numpy as np

    from timecma.core.manifest import read_manifest
    from timecma.runtime import make_backend

    m = read_manifest(str(small_bundle))
    eager = make_backend("torch", str(small_bundle), m)
    compiled = make_backend("torch", str(small_bundle), m, compile=True)
    assert compiled.name == "torch-compile" and compiled.llm_precision == "fp32"
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, (3, 17)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    ref = eager.run_llm(ids, mask)
    np.testing.assert_allclose(compiled.run_llm(ids, mask), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    x = rng.normal(size=(2, m.model_config.seq_len, m.model_config.num_nodes)).astype(np.float32)
    emb = rng.normal(size=(2, m.model_config.num_nodes, m.model_config.d_llm)).astype(np.float32)
    y = eager.run_forecaster(x, emb)
    np.testing.assert_allclose(compiled.run_forecaster(x, emb), y, atol=1e-4 * np.abs(y).max(), rtol=0)


def test_forecaster_profile_says_where_a_store_hit_goes(small_bundle, tmp_path):
    """benchmarks.forecaster_profile: every forecaster graph of the bundle timed, and an op profile that adds up."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'timecma[openvino]')")
    r = run_cli("timecma.benchmarks.forecaster_profile:main", "--bundle", str(small_bundle), "--iters", "20",
                "--out", str(tmp_path / "prof"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "prof" / "results.json").read_text())
    graphs = {row["graph"] for row in res["rows"]}
    assert {"dynamic batch", "batch 1"} <= graphs and all(row["p50_ms"] > 0 for row in res["rows"])
    assert res["fastest"]["p50_ms"] == min(row["p50_ms"] for row in res["rows"])
    assert res["profile_total_us"] == pytest.approx(sum(res["profile_us"].values()), rel=1e-3)
    assert sum(res["profile_nodes"].values()) > 10


def test_lossless_u4_rebuilds_only_weights_on_a_4_bit_group_grid_and_equals_them():
    """benchmarks.w8a8_sensitivity: a Q4_1-style linear (16 levels per group of 32 inputs) becomes OpenVINO u4
    weights plus group offsets with the same f32 output (1e-5 of its scale: two summation orders); a linear off
    that grid is left float, untouched."""
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'timecma[openvino]')")
    import numpy as np
    from openvino import opset13 as ops

    from conftest import assert_float32_close
    from timecma.benchmarks.w8a8_sensitivity import lossless_u4

    rng = np.random.default_rng(0)
    step, low = rng.uniform(0.01, 0.1, (1, 2, 24)), rng.uniform(-1, 0, (1, 2, 24))  # 64 inputs, 24 outputs
    q = rng.integers(0, 16, (32, 2, 24)).astype(np.float64)
    q[0], q[1] = 0, 15  # each group spans its 16 levels, as llama.cpp's Q4_1 quantiser makes it
    on_grid = (q * step + low).transpose(1, 0, 2).reshape(64, 24).astype(np.float32)
    off_grid = rng.standard_normal((24, 8)).astype(np.float32)
    x = ops.parameter([2, 3, 64], np.float32)
    y = ops.matmul(ops.matmul(x, ops.constant(on_grid), False, False), ops.constant(off_grid), False, False)
    model = ov.Model([y], [x])
    feed = rng.standard_normal((2, 3, 64)).astype(np.float32)
    want = feed @ on_grid.astype(np.float64) @ off_grid
    assert lossless_u4(model) == 1
    assert ov.Type.u4 in {op.get_output_element_type(0) for op in model.get_ops() if op.get_type_name() == "Constant"}
    # OpenVINO quantises the activations of compressed-weight MatMuls by default (what the benchmark measures)
    exact = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
    assert_float32_close(ov.Core().compile_model(model, "CPU", exact)(feed)[0], want)


def test_bf16_anchors_without_native_bf16_are_called_emulated_and_the_fastest_torch_row_is_named():
    """On an AVX2-only CPU eager bf16 runs several times slower than fp32 (SmolLM2: 5.8x): the report says so
    and names the fastest PyTorch row per kind, whose column is the speed-up a user there gets."""
    from timecma.benchmarks.harness import KINDS, add_speedups
    from timecma.benchmarks.report import _bf16_note

    def row(ms: float) -> dict:
        return {k: {"end_to_end_ms": {"p50": ms}} for k in KINDS}

    res = {"machine": {"isa": ["avx2"]},
           "backends": {"torch": row(4.0), "torch-bf16": row(24.0), "torch-compile": row(3.0), "openvino": row(2.0)}}
    add_speedups(res)
    assert res["fastest_torch"]["miss"] == "torch-compile"
    assert res["backends"]["openvino"]["speedup_vs"]["fastest-torch"]["miss"] == 1.5
    assert res["backends"]["openvino"]["speedup_vs"]["torch-bf16"]["miss"] == 12.0
    note = " ".join(_bf16_note(res, res["fastest_torch"]))
    assert "no native bf16" in note and "`torch-bf16` 6.0x" in note and "`torch-compile`" in note
    res["machine"]["isa"] = ["avx2", "avx512_bf16"]
    assert _bf16_note(res, res["fastest_torch"]) == []  # native bf16: the anchors are what users run


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefix_computed_once_gives_the_embeddings_serving_computes(arch, tmp_path):
    """The padding benchmark's timed alternative is the same function: a window's common prefix run once
    with its keys and values kept, each planned call of suffixes from position P on, equals serving's
    planned calls to float32 rounding (GPT-2 and Llama, whose tokenizer prepends BOS)."""
    import numpy as np

    from conftest import ETTH1, assert_float32_close
    from timecma.benchmarks.padding_waste import common_prefix, planned_embeddings, shared_prefix_embeddings
    from timecma.core.prompts import PromptRenderer, get_template
    from timecma.core.tokens import encode_prompts
    from timecma.data import load_series
    from timecma.llm import build_tiny_llm, load_llm

    llm = load_llm(build_tiny_llm(tmp_path / arch, arch=arch), "cpu", last_position_only=False)
    series = load_series(str(ETTH1), "date")
    prompts = PromptRenderer(get_template("reference"), series.frequency).render_series(
        series.values, series.timestamps, np.array([9000]), 96)
    ids = encode_prompts(llm.backend, prompts)
    assert 10 < common_prefix(ids) < min(len(t) for t in ids)  # "From <start> to <end>, the values were"
    assert len({len(t) for t in ids}) > 1  # ragged: the suffix calls are padded, the prefix positions are not
    assert_float32_close(shared_prefix_embeddings(llm, ids, max_batch=3), planned_embeddings(llm, ids, max_batch=3))
    assert common_prefix([np.array([5, 6]), np.array([5, 6, 7])]) == 1  # every prompt keeps a position of its own


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compute_bound_counts_the_flops_the_decoder_layers_compute(arch, tmp_path):
    """benchmarks.compute_bound: the linear weights it counts from the config are the decoder layers'
    2-D weights (GPT-2's Conv1D, Llama's q/k/v/o with fewer KV heads and its gated MLP), and the FLOPs of N
    prompts of T tokens are 2 per weight per token plus attention's two T x T products per layer."""
    import re

    from timecma.benchmarks.compute_bound import llm_shapes, stage_flops
    from timecma.llm import build_tiny_llm, load_llm

    d = build_tiny_llm(tmp_path / arch, arch=arch)
    s = llm_shapes(d)
    model = load_llm(d, "cpu", last_position_only=False).encoder.model
    in_layers = [p.numel() for n, p in model.named_parameters() if p.dim() == 2 and re.search(r"(^|\.)(h|layers)\.\d", n)]
    assert s["linear_weights"] == sum(in_layers) and len(in_layers) == s["layers"] * (4 if arch == "gpt2" else 7)
    f = stage_flops(s, n=7, tokens=10)
    assert f["linear"] == 2 * sum(in_layers) * 70
    assert f["attention"] == 2 * 2 * s["layers"] * 7 * 10 * 10 * s["d"] and f["total"] == f["linear"] + f["attention"]


def test_compute_bound_floors_each_precision_at_its_fastest_kernel():
    """The floor each precision allows is the stage's FLOPs at the best dense rate of that precision (over
    runtimes), stated as the most it can beat eager and compiled bf16 by."""
    from timecma.benchmarks.compute_bound import bounds, stage_flops

    s = {"layers": 2, "d": 8, "linear_weights": 1000}
    gflop = stage_flops(s, 7, 16)["total"] / 1e9
    stage = [{"backend": b, "n": 7, "tokens": 16, "ms": ms} for b, ms in (("torch-bf16", 4.0), ("torch-compile-bf16", 2.0))]
    ceilings = [{"runtime": "torch", "precision": "bf16", "tflops": gflop / 0.5},  # GFLOP per ms is TFLOP/s
                {"runtime": "openvino", "precision": "bf16", "tflops": gflop / 0.25},
                {"runtime": "openvino", "precision": "int8", "tflops": gflop / 0.125}]
    b = bounds(stage, ceilings, s)
    assert b["bf16"]["best_runtime"] == "openvino" and b["bf16"]["floor_ms"] == pytest.approx(0.25)
    assert b["bf16"]["ceiling_vs_torch-bf16"] == pytest.approx(16) and b["bf16"]["ceiling_vs_torch-compile-bf16"] == \
        pytest.approx(8)
    assert b["int8"]["ceiling_vs_torch-compile-bf16"] == pytest.approx(16)


def test_compute_bound_times_each_stage_beside_every_ceiling_and_names_what_did_not_run(small_bundle, small_run,
                                                                                          tmp_path):
    """Every runtime and precision gets a dense rate (bf16 only where the CPU computes it), each backend's LLM
    stage a rate judged against its own runtime's ceiling; a backend that cannot run is named, and a run where
    none can is refused with a usage error that says why."""
    from timecma.core.machine import has_native_bf16

    args = ["--bundle", str(small_bundle), "--data", str(small_run[0]), "--n-vars", "3", "--prompt-tokens", "16",
            "--rounds", "1"]
    r = run_cli("timecma.benchmarks.compute_bound:main", *args, "--backends", "torch,ort-cpu,openvino:f32,bogus",
                "--out", str(tmp_path / "cb"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "cb" / "results.json").read_text())
    got = {(c["runtime"], c["precision"]) for c in res["dense_ceilings"] if c["tflops"] > 0}
    assert {("torch", "f32"), ("onnxruntime", "f32"), ("onnxruntime", "int8"), ("openvino", "f32"),
            ("openvino", "int8")} <= got
    assert (("openvino", "bf16") in got) == (("torch", "bf16") in got) == has_native_bf16()
    assert [(s["backend"], s["runtime"], s["precision"]) for s in res["llm_stage"]] == [
        ("torch", "torch", "f32"), ("ort-cpu", "onnxruntime", "f32"), ("openvino:f32", "openvino", "f32")]
    assert all(s["tflops"] > 0 and s["gflop"] > 0 for s in res["llm_stage"]) and "bogus" in res["skipped"]
    assert "bogus not run" in (tmp_path / "cb" / "results.md").read_text()
    r = run_cli("timecma.benchmarks.compute_bound:main", *args, "--backends", "bogus", "--out", str(tmp_path / "cb2"))
    assert r.returncode == 2 and "none of ['bogus'] can run here" in r.stderr and not (tmp_path / "cb2").exists()
