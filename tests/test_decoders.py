"""Any Hugging Face decoder as the frozen LLM: Llama, Mistral (sliding window) and Qwen2 go through
the same last-token wrapper, export and runtime as GPT-2; positions stay right under right
padding (RoPE); the tokenizer's BOS handling is recorded and reproduced at serving."""

import numpy as np
import pytest
import torch

from conftest import TRAIN_ARGS, make_frame, run_cli
from timecma.core.tokens import pad_right

ARCHES = ["llama", "mistral", "qwen2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from timecma.llm import build_tiny_llm

    d = tmp_path_factory.mktemp("decoders")
    return {a: build_tiny_llm(d / a, arch=a) for a in ARCHES}


@pytest.mark.parametrize("arch", ARCHES)
def test_last_token_graph_matches_each_prompt_run_alone(tiny, tmp_path, arch):
    """Padded batches through the exported graph equal each prompt through the unmodified Hugging
    Face model alone (no padding at all): positions and masks are right, for every architecture."""
    import onnxruntime as ort

    from timecma.export.onnx_export import export_llm
    from timecma.llm import load_llm
    from timecma.runtime.compile.tensorrt import EngineProfile, build_plan
    from timecma.runtime.engines.trt_flavour import load_flavour

    llm = load_llm(tiny[arch])
    assert llm.encoder.last_position_only is False  # the last-block shortcut is GPT-2's; skipped here
    assert llm.info.extra["tokenizer"]["adds_bos"] is (arch != "qwen2")
    path = str(tmp_path / "llm.onnx")
    export_llm(llm.encoder, path, llm.info.max_positions)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for batch, longest in ((4, 150), (1, 9)):  # 150 > Mistral's sliding window of 64
        ids = [rng.integers(3, 500, size=int(n)) for n in rng.integers(1, longest + 1, size=batch)]
        ids[0] = rng.integers(3, 500, size=longest)
        a, m = pad_right(ids, llm.info.pad_id)
        got = sess.run(None, {"input_ids": a, "attention_mask": m})[0]
        with torch.no_grad():
            alone = np.stack([llm.encoder.model(input_ids=torch.from_numpy(x)[None]).last_hidden_state[0, -1].numpy()
                              for x in ids])
        np.testing.assert_allclose(got, alone, atol=1e-4, rtol=0)
    plan, report, _, _ = build_plan(load_flavour("rtx"), path, EngineProfile(llm_seq=(1, 128, 512)).shapes("llm", None),
                                    ["86", "89", "120"], True)
    assert report["parser_errors"] == 0 and len(plan) > 0


def test_llama_llm_trains_exports_and_serves_like_gpt2(tiny, tmp_path):
    from tokenizers import Tokenizer

    from timecma.core.manifest import read_manifest
    from timecma.runtime import Forecaster

    frame = make_frame(300, seed=2)
    data = tmp_path / "d.csv"
    frame.to_csv(data, index=False)
    out = tmp_path / "run"
    r = run_cli("timecma.cli:train_cmd", "--data", str(data), "--llm", tiny["llama"], "--out", str(out), *TRAIN_ARGS)
    assert r.returncode == 0, r.stderr
    r = run_cli("timecma.export.cli:export_cmd", "--ckpt", str(out / "best.pt"), "--parity-windows", "2")
    assert r.returncode == 0, r.stderr
    m = read_manifest(out / "bundle")
    assert m.llm.info["extra"]["model_type"] == "llama" and m.llm.info["extra"]["tokenizer"]["adds_bos"]
    assert m.graphs["llm"].info["last_block_last_position_only"] is False
    tok = Tokenizer.from_file(str(out / "bundle" / m.tokenizer["file"]))  # serving's tokenizer frames as training's
    assert tok.encode("From 01/01/2020").ids[0] == tok.token_to_id("<s>")
    window = frame.iloc[-24:]
    store = tmp_path / "store"
    y = Forecaster.load(str(out / "bundle"), backend="ort-cpu", store=str(store)).predict(window)
    eager = Forecaster.load(str(out / "bundle"), backend="torch").predict(window)
    scale = frame[["v0", "v1", "v2"]].to_numpy().std(axis=0)
    assert (np.abs(y - eager) / scale).max() <= 1e-4
    again = Forecaster.load(str(out / "bundle"), backend="ort-cpu", store=str(store))
    np.testing.assert_array_equal(again.predict(window), y)
    assert again.stats.hits == 3 and again.stats.llm_calls == 0


@pytest.mark.parametrize("arch", ["gpt2", *ARCHES])
def test_llm_layers_is_the_state_after_k_layers_and_the_final_norm(tiny, tiny_llm_dir, arch):
    """--llm-layers 1 of 2: the embedding equals the unmodified model's hidden state after layer 1, through
    the final norm, at the last token; the wrapper holds one layer and records it."""
    from transformers import AutoModel

    from timecma.llm import encode_last_token, load_llm

    path = tiny_llm_dir if arch == "gpt2" else tiny[arch]
    llm = load_llm(path, layers=1)
    assert llm.info.extra["layers"] == 1 and llm.info.extra["model_layers"] == 2
    assert llm.info.namespace != load_llm(path).info.namespace
    ids = [np.asarray(llm.backend.encode("From 01/01/2020 00:00 to 02/01/2020 00:00, the values were 5, 7, 9").ids)]
    got = encode_last_token(llm, ids)
    full = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = full(torch.from_numpy(ids[0])[None], output_hidden_states=True).hidden_states[1][:, -1]
        want = (full.ln_f if arch == "gpt2" else full.norm)(hidden).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
