"""timecma-export: two ONNX graphs with dynamic axes, parity, atomic bundle, refusals."""

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import bundle_with_manifest_version, run_cli
from timecma.checkpoint import build_model, load_checkpoint
from timecma.core.config import ModelConfig
from timecma.llm import LastTokenEncoder, load_llm
from timecma.core.errors import BundleError
from timecma.core.manifest import read_manifest
from timecma.core.tokens import pad_right

EXPORT = "timecma.export.cli:export_cmd"


def test_bundle_layout_and_manifest(small_bundle, small_run):
    typed = read_manifest(small_bundle)
    m = json.loads((small_bundle / "manifest.json").read_text())  # what is on disk round-trips through the schema
    assert typed.to_dict() == m
    assert m["manifest_version"] == 2 and typed.opset >= 17
    assert (small_bundle / "llm_last_token.onnx").exists() and (small_bundle / "forecaster.onnx").exists()
    assert (small_bundle / "tokenizer" / "tokenizer.json").exists()
    assert not list(small_bundle.glob("*.pt")) and not list(small_bundle.glob("*.pkl"))  # no pickles
    llm_par = m["graphs"]["llm"]["parity_vs_torch"]["ort_cpu_fp32"]
    assert max(v["max_abs"] for v in llm_par.values()) <= 1e-4
    fc_par = m["graphs"]["forecaster"]["parity_vs_torch"]["ort_cpu_fp32"]
    assert max(v["max_abs"] for v in fc_par.values()) <= 1e-4
    assert m["graphs"]["forecaster"]["scaler"] == "in_graph"
    assert m["graphs"]["llm"]["cpu_preferred"] in m["graphs"]["llm"]["files"]
    assert "fp16" in m["graphs"]["llm"]["files"] and "fp16" in m["graphs"]["forecaster"]["files"]
    assert {"torch", "onnx", "onnxruntime", "tensorrt"} <= set(m["versions"])
    assert m["data"]["variables"] == ["v0", "v1", "v2"] and m["llm"]["digest_verified"]
    assert m["graphs"]["llm"]["last_block_last_position_only"] is True


def test_fp16_graph_keeps_sensitive_ops_and_io_in_fp32(small_bundle):
    """Only the weight matmuls compute in fp16: no other node (norms, residual adds, softmax, attention
    scores) reads or writes an fp16 tensor, and the graph's I/O stays fp32."""
    import onnx

    model = onnx.load(small_bundle / "llm_last_token.fp16.onnx")
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(model.graph.input) + list(model.graph.output)}
    assert types["last_hidden"] == onnx.TensorProto.FLOAT
    init16 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert init16, "weights were not converted to fp16"
    inferred = onnx.shape_inference.infer_shapes(model)
    dtype = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.graph.value_info)}
    dtype.update({i: onnx.TensorProto.FLOAT16 for i in init16})
    fp16_users = {n.op_type for n in model.graph.node
                  if any(dtype.get(t) == onnx.TensorProto.FLOAT16 for t in (*n.input, *n.output))}
    assert fp16_users <= {"MatMul", "Gemm", "Cast"} and "Cast" in fp16_users
    ln_inputs = {n.input[0] for n in model.graph.node if n.op_type == "LayerNormalization"}
    assert ln_inputs and all(dtype.get(t, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for t in ln_inputs)


@pytest.mark.parametrize("batch", [1, 3, 7, 32])
@pytest.mark.parametrize("seq", [5, 97, 300])
def test_llm_graph_axes_are_dynamic(small_bundle, tiny_llm_dir, batch, seq):
    llm = load_llm(tiny_llm_dir)
    sess = ort.InferenceSession(str(small_bundle / "llm_last_token.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(batch * 1000 + seq)
    ids = [rng.integers(1, 500, size=int(n)) for n in rng.integers(1, seq + 1, size=batch)]
    ids[0] = rng.integers(1, 500, size=seq)  # at least one full-length row
    a, m = pad_right(ids, llm.info.pad_id)
    got = sess.run(None, {"input_ids": a, "attention_mask": m})[0]
    plain = LastTokenEncoder(llm.encoder.model, last_position_only=False)  # the unmodified HF forward
    with torch.no_grad():
        ref = plain(torch.from_numpy(a), torch.from_numpy(m)).numpy()
    assert got.shape == (batch, 32)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_forecaster_graph_returns_original_units(small_bundle, small_run):
    _, run = small_run
    ckpt = load_checkpoint(run / "best.pt")
    model = build_model(ModelConfig(**ckpt["model_config"]), ckpt["state_dict"])
    mean, std = np.array(ckpt["data"]["scaler_mean"]), np.array(ckpt["data"]["scaler_std"])
    b1 = read_manifest(small_bundle).graphs["forecaster"].cpu_batch1  # the graph batch-1 requests use
    assert b1.file in ("forecaster.onnx", "forecaster.b1.onnx") and (small_bundle / b1.file).exists()
    for b, file in ((1, "forecaster.onnx"), (3, "forecaster.onnx"), (1, b1.file)):
        sess = ort.InferenceSession(str(small_bundle / file), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(b)
        x = (rng.normal(size=(b, 24, 3)) * std + mean).astype(np.float32)
        emb = rng.normal(size=(b, 3, 32)).astype(np.float32)
        y = sess.run(None, {"x": x, "prompt_emb": emb})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(((x - mean) / std).astype(np.float32)), torch.from_numpy(emb)).numpy()
        np.testing.assert_allclose((y - mean) / std, ref, atol=1e-4, rtol=0)
    # the split pair batch-1 requests with a store use: the prompt encoder is the model's, the head gives y
    m = read_manifest(small_bundle)
    split = m.graphs["forecaster"].cpu_split
    assert {split.prompt_encoder.file, split.head.file} <= set(m.files)
    assert split.info["parity_vs_torch"]["max_abs"] <= m.info["parity_tolerance"]
    enc, head = (ort.InferenceSession(str(small_bundle / g.file), providers=["CPUExecutionProvider"])
                 for g in (split.prompt_encoder, split.head))
    with torch.no_grad():
        want_enc = model.encode_prompts(torch.from_numpy(emb[:1])).numpy()
    got_enc = enc.run(None, {"prompt_emb": emb[:1]})[0]
    np.testing.assert_allclose(got_enc, want_enc, atol=1e-4, rtol=0)
    y1 = head.run(None, {"x": x[:1], "prompt_enc": got_enc})[0]
    np.testing.assert_allclose((y1 - mean) / std, ref[:1], atol=1e-4, rtol=0)


def test_existing_bundle_needs_force(small_run, tmp_path):
    _, run = small_run
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli(EXPORT, "--ckpt", str(run / "best.pt"), "--out", str(out))
    assert r.returncode == 2 and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_checkpoints_leave_no_bundle(small_run, tmp_path, other_llm_dir):
    _, run = small_run
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    future = tmp_path / "future.pt"
    torch.save({**load_checkpoint(run / "best.pt"), "format_version": 99}, future)
    cases = [
        (tmp_path / "missing.pt", [], "does not exist"),
        (corrupt, [], "corrupt or not a torch file"),
        (future, [], "checkpoint format 99"),
        (run / "best.pt", ["--llm", other_llm_dir], "weights digest"),
    ]
    if not _has_standard_tensorrt():
        cases.append((run / "best.pt", ["--tensorrt", "require", "--trt-flavour", "standard"],
                      "--tensorrt require, but TensorRT is not installed"))
    for i, (ckpt, extra, message) in enumerate(cases):
        out = tmp_path / f"bundle{i}"
        r = run_cli(EXPORT, "--ckpt", str(ckpt), "--out", str(out), *extra)
        assert r.returncode == 2 and message in r.stderr, (message, r.stderr[-500:])
        assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bundle-")]  # no temp leftovers


def test_reference_state_dict_import(small_run, tiny_llm_dir, tmp_path):
    data, run = small_run
    sd = dict(load_checkpoint(run / "best.pt")["state_dict"])
    template = {k.replace("ts_encoder.layers.0.", "ts_encoder_layer."): v.clone()
                for k, v in sd.items() if k.startswith("ts_encoder.layers.0.")}
    ref = tmp_path / "best_model.pth"
    torch.save({**sd, **template}, ref)
    out = tmp_path / "ref_bundle"
    r = run_cli(EXPORT, "--ckpt", str(ref), "--from-reference", "--data", str(data), "--llm", tiny_llm_dir,
                "--seq-len", "24", "--pred-len", "12", "--out", str(out))
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["model_config"]["channel"] == 16 and m["model_config"]["pred_len"] == 12
    assert m["llm"]["digest_verified"] is False and m["origin"]["kind"] == "public-reference state_dict"
    # shapes that contradict flags, and keys the model does not have, are errors
    r = run_cli(EXPORT, "--ckpt", str(ref), "--from-reference", "--data", str(data), "--llm", tiny_llm_dir,
                "--pred-len", "48", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "pred_len=48 but the tensors say 12" in r.stderr
    torch.save({**sd, "mystery.weight": torch.zeros(2)}, ref)
    r = run_cli(EXPORT, "--ckpt", str(ref), "--from-reference", "--data", str(data), "--llm", tiny_llm_dir,
                "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "unexpected ['mystery.weight']" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_manifest_version_is_checked(small_bundle, tmp_path):
    copy = bundle_with_manifest_version(small_bundle, tmp_path / "b", 3)
    with pytest.raises(BundleError, match="manifest version 3.*upgrade timecma"):
        read_manifest(copy)


def _has_standard_tensorrt() -> bool:
    from timecma.runtime.engines.trt_flavour import installed

    return not installed()["tensorrt"].startswith("not installed")


def test_int8_and_w8a8_variants_are_judged_on_forecast_mse_and_embeddings(small_run, tmp_path):
    data, run = small_run
    out = tmp_path / "bundle"
    r = run_cli(EXPORT, "--ckpt", str(run / "best.pt"), "--out", str(out), "--quantize", "int8", "--quantize", "w8a8",
                "--quantize-windows", "16", "--tensorrt", "skip", "--openvino", "skip")
    assert r.returncode == 0, r.stderr
    llm = read_manifest(out).graphs["llm"]
    for kind in ("int8", "w8a8"):
        q = llm.files[kind].info if kind in llm.files else llm.info[f"{kind}_rejected"]
        # w8a8 is judged on the windows sharing no time step with its calibration windows (all, said, if none)
        assert (q["windows"] == 16 if kind == "int8" else 0 < q["windows"] <= 16)
        assert q["hidden_max_rel_err"] > 0  # int8 really changed the hidden states
        assert q["mse_rel_change"] == pytest.approx(abs(q[f"val_mse_{kind}"] - q["val_mse_fp32"]) / q["val_mse_fp32"])
        # judged by the one decision every variant takes: finite outputs, MSE, embeddings, and each forecast value
        assert q["accepted"] == (q["mse_rel_change"] < 0.01 and q["embedding"]["prompt_rel_l2_max"] < 0.05
                                 and q["forecast_max_abs_change_normalized"] < 0.01)
        assert q["finite"] and q["forecast_max_abs_change_normalized"] > 0
        assert (out / f"llm_last_token.{kind}.onnx").exists() == q["accepted"]
        if kind == "w8a8":  # static: calibrated, the attention's activation MatMuls left float
            assert q["calibration_prompts"] > 0 and q["float_activation_matmuls"] > 0
            # scored apart from its calibration windows, or (the small test series) the record says they overlap
            assert (f"({q['windows']} of 16)" in q["scored_on"] if "sharing no time step" in q["scored_on"]
                    else "overlapping" in q["scored_on"] and q["windows"] == 16), q["scored_on"]
        if q["accepted"]:
            from timecma.runtime import Forecaster

            f = Forecaster.load(str(out), backend="ort-cpu", llm_variant=kind)
            assert f.backend.llm_variant == kind and f.backend.llm_precision == f"ort:{kind}"


def test_manifest_has_no_build_machine_paths(small_bundle, small_run):
    """What the bundle came from is recorded by name, sha256 and size, never by this machine's paths."""
    data, run = small_run
    text = (small_bundle / "manifest.json").read_text()
    assert str(run.parent) not in text and os.path.expanduser("~") + "/" not in text and "/tmp/" not in text
    m = read_manifest(small_bundle)
    assert m.origin["kind"] == "timecma checkpoint" and m.origin["file"] == "best.pt"
    assert m.data.source["file"] == "small.csv" and m.data.source["rows"] == 500
    assert len(m.data.source["sha256"]) == 64 and m.llm.info["local_directory"] is True


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m["llm"].pop("namespace"), "manifest: llm lacks 'namespace'"),
    (lambda m: m["graphs"]["llm"]["files"].pop("fp32"), "graphs.llm has no fp32 graph"),
    (lambda m: m["graphs"].pop("forecaster"), "graphs lacks ['forecaster']"),
    (lambda m: m["engines"][0].update(graph="decoder"), "engines[0].graph 'decoder' is not one of"),
    (lambda m: m["files"]["forecaster.onnx"].update(bytes="1"), "files.forecaster.onnx.bytes should be int"),
    (lambda m: m.update(manifest_version=1), "manifest version 1; this timecma reads version 2 (re-export"),
])
def test_malformed_manifest_is_refused_naming_the_key(small_bundle, tmp_path, mutate, message):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(small_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    mutate(m)
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as exc:
        read_manifest(b, verify=False)
    assert message in str(exc.value)


def test_export_builds_engines_at_the_profile_of_the_real_prompts(small_bundle):
    """Export built its engines at opt 7 prompts x 256 tokens whatever the bundle's N and prompts; now at the
    profile `timecma-engines build` takes by default (``default_profile``: a window's N prompts, the length
    the bundle's validation prompts pad to)."""
    from timecma.runtime.compile.tensorrt import default_profile

    m = read_manifest(small_bundle)
    llm = [e for e in m.engines if e.graph == "llm"]
    if not llm:
        pytest.skip(f"no engines were built here: {m.info['tensorrt_note']}")
    p = default_profile(m, str(small_bundle))
    assert p.llm_batch[1] == m.model_config.num_nodes != 7 and p.llm_seq[1] != 256
    for e in llm:
        assert e.profile["input_ids"] == [[b, s] for b, s in zip(p.llm_batch, p.llm_seq)]
    assert m.info["tensorrt_note"].startswith("engines built with") and "refused" not in m.info["tensorrt_note"]


def test_tensorrt_note_names_the_engines_the_gate_refused_with_their_figures(small_bundle):
    """What export records when the gate (on a GPU) refuses an engine: which one and its figures. The build
    result is supplied (no GPU here), as `build_engines` returns it."""
    import dataclasses

    from timecma.export.bundle import tensorrt_note
    from timecma.core.accuracy import judge_variant
    from timecma.runtime.compile.tensorrt import PARITY_KEY

    m = read_manifest(small_bundle)
    if not m.engines:
        pytest.skip(f"no engines were built here: {m.info['tensorrt_note']}")
    rng = np.random.default_rng(0)
    y_ref, truth = rng.normal(size=(4, 6, 3)), rng.normal(size=(4, 6, 3))
    mean, std = np.zeros(3), np.ones(3)
    verdict = judge_variant(y_ref + 0.5, y_ref, truth, mean, std)
    e = m.engines[0]
    refused = dataclasses.replace(e, info={**e.info, PARITY_KEY: {**verdict, "gpu": "sm89", "windows": 4,
                                                                 "batch_sizes": [1, 4]}})
    note = tensorrt_note([], [refused], ("fp16",))
    assert note.startswith("no engine added; refused by the gate on this GPU, not added to the bundle: ")
    assert f"{e.graph} {e.precision} ({os.path.basename(e.file)}): REFUSED (forecast moved 5.0e-01" in note
    assert "on sm89, 4 windows at batch 1/4" in note
    both = tensorrt_note(m.engines[1:], [refused], ("fp16",))
    assert both.startswith("engines built with tensorrt_rtx") and "REFUSED" in both
    assert tensorrt_note([], [], ("fp16",)).startswith("no graph has a fp16 variant that passed its CPU check")
