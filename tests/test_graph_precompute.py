"""Training's precompute on the runtime's engines (issue 22, part 5): the exported LLM graph on ONNX Runtime
or OpenVINO fills the store; reduced precisions are gated and keyed apart; serving at the same precision hits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from timecma.core.errors import InputError
from timecma.core.store import EmbeddingStore, precision_tag
from timecma.core.tokens import encode_prompts
from timecma.encoders import prompt_encoder
from timecma.llm import encode_last_token, load_llm

from conftest import TRAIN_ARGS, run_cli

pytest.importorskip("onnxruntime")
PROMPTS = [f"From 01/01/2020 00:00 to 02/01/2020 00:00, the values were {i}, {i * 7 % 31}, {i % 5}, {i * 3} every "
           f"hour. The total trend value was {i / 7:0f}" for i in range(12)]
FP32_TOL = 1e-4  # exported fp32 graph vs eager PyTorch, max abs on the tiny LLM's last hidden state


def test_store_keys_each_precision_apart(tmp_path):
    """A vector written at one precision is never read as another; fp32 keys are the ones stores always had."""
    ids = [np.arange(5), np.arange(3) + 7]
    vec = np.ones((2, 4), np.float32)
    with EmbeddingStore(tmp_path / "s", "ab" * 32, 4, precision="openvino:bf16") as bf16:
        bf16.put_many(bf16.keys(ids), vec, ["p0", "p1"])
        assert bf16.get_many(bf16.keys(ids))[1].all() and bf16.get_many_by_text(["p0", "p1"])[1].all()
    with EmbeddingStore(tmp_path / "s", "ab" * 32, 4) as fp32:  # same store, same model, fp32
        assert not fp32.get_many(fp32.keys(ids))[1].any()
        assert not fp32.get_many_by_text(["p0", "p1"])[1].any()
        assert fp32.key(ids[0]) == EmbeddingStore(tmp_path / "t", "ab" * 32, 4).key(ids[0])
    with EmbeddingStore(tmp_path / "s", "ab" * 32, 4, precision="tensorrt:fp16") as fp16:
        assert not fp16.get_many(fp16.keys(ids))[1].any()
    assert precision_tag("openvino", "f32") == precision_tag("ort-cpu", "fp32-ort-opt") == "fp32"
    assert precision_tag("ort-cuda", "int8") == precision_tag("ort-cpu", "int8") == "ort:int8"


@pytest.mark.parametrize("choice", ["ort-cpu", "openvino"])
def test_fp32_graph_encoder_matches_eager(tiny_llm_dir, choice):
    if choice == "openvino":
        pytest.importorskip("openvino")
    llm = load_llm(tiny_llm_dir)
    ids = encode_prompts(llm.backend, PROMPTS)
    enc = prompt_encoder(llm, choice, ids[:4])
    assert enc.precision == "fp32"
    assert enc.record["embedding"]["prompt_rel_l2_max"] < 1e-5
    # a padded batch of prompts of different lengths, as precompute runs them
    np.testing.assert_allclose(enc(ids), encode_last_token(llm, ids), atol=FP32_TOL, rtol=0)


def test_gate_refuses_with_the_figure(tiny_llm_dir):
    pytest.importorskip("openvino")
    llm = load_llm(tiny_llm_dir)
    ids = encode_prompts(llm.backend, PROMPTS)
    with pytest.raises(InputError, match=r"openvino:int8 fails the embedding gate: worst prompt's embedding error "
                                         r"\d\.\d\de-\d\d on 4 prompts"):
        prompt_encoder(llm, "openvino:int8", ids[:4], gate=1e-6)  # int8 weights cannot stay within 1e-6


@pytest.mark.slow
def test_train_on_openvino_bf16_then_serve_hits_only_at_that_precision(tiny_llm_dir, tmp_path):
    ov = pytest.importorskip("openvino")
    from timecma.core.machine import has_native_bf16
    from timecma.runtime import Forecaster
    from conftest import make_frame

    if not has_native_bf16():
        pytest.skip("OpenVINO bf16 needs a CPU with native bf16 (AVX-512 BF16 or AMX)")
    data = tmp_path / "small.csv"
    frame = make_frame()
    frame.to_csv(data, index=False)
    out = tmp_path / "run"
    r = run_cli("timecma.cli:train_cmd", "--data", str(data), "--llm", tiny_llm_dir, "--out", str(out), *TRAIN_ARGS,
                "--precompute-backend", "openvino:bf16")
    assert r.returncode == 0, r.stderr
    ck = torch.load(out / "best.pt", weights_only=False)
    rec = ck["llm"]["extra"]["precompute"]
    assert rec["precision"] == "openvino:bf16" and rec["embedding"]["prompt_rel_l2_max"] < 0.05
    r = run_cli("timecma.export.cli:export_cmd", "--ckpt", str(out / "best.pt"))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["llm"]["extra"]["precompute"]["precision"] == "openvino:bf16"
    window = frame.iloc[:24]  # a training window: its prompts are in the store
    stats = {}
    for name, kwargs in (("bf16", dict(backend="openvino", precision={"llm": "bf16", "forecaster": "f32"})),
                         ("fp32", dict(backend="ort-cpu", llm_variant="fp32"))):
        f = Forecaster.load(str(out / "bundle"), store=str(out / "store"), **kwargs)
        f.predict(window)
        stats[name] = (f.stats.hits, f.stats.misses, f.backend.llm_precision)
        f.store.close()
    assert stats["bf16"] == (3, 0, "openvino:bf16")  # serving at the precision that filled the store: all hits
    assert stats["fp32"] == (0, 3, "fp32")  # fp32 serving never reads the bf16 vectors
    assert ov is not None


def test_eager_bf16_encoder_is_gated_and_keyed_apart(tiny_llm_dir):
    llm = load_llm(tiny_llm_dir)
    ids = encode_prompts(llm.backend, PROMPTS)
    enc = prompt_encoder(llm, "torch:bf16", ids[:4])
    assert enc.precision == "torch:bf16"
    err = enc.record["embedding"]["prompt_rel_l2_max"]
    assert 0 < err < 0.05  # bf16 moves the embeddings, measurably and within the gate
    assert next(llm.encoder.parameters()).dtype == torch.float32  # the reference model stays fp32
