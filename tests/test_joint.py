"""Joint text and time-series training (`--joint lora|full`): where gradients go, what the weight does, that
the merged LLM embeds as the adapted one did, that old stores are refused for it, and that export and serving
take the result unchanged."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TRAIN_ARGS, run_cli

pytest.importorskip("peft", reason="--joint lora needs peft (pip install 'timecma[joint]')")

from timecma.core.config import ModelConfig  # noqa: E402
from timecma.core.errors import InputError  # noqa: E402
from timecma.core.tokens import encode_prompts  # noqa: E402
from timecma.joint import JointModel, Prompts, load_causal_lm, merge_and_save  # noqa: E402
from timecma.llm import load_llm  # noqa: E402
from timecma.model import make_model  # noqa: E402

N, L, H = 3, 24, 12


def _batch(llm_dir: str, windows: int = 2):
    llm = load_llm(llm_dir)
    texts = [f"From 01/01/2020 00:00 to 02/01/2020 00:00, the values were {i}, {i + 1}, {2 * i} every hour."
             for i in range(windows * N)]
    prompts = Prompts.pad(encode_prompts(llm.backend, texts), llm.info.pad_id)
    x = torch.randn(windows, L, N)
    y = torch.randn(windows, H, N)
    return llm, prompts, x, y


def _joint(llm_dir: str, mode: str, d_llm: int) -> JointModel:
    lm, _ = load_causal_lm(llm_dir, mode, "pretrained", None)
    torch.manual_seed(0)
    cfg = ModelConfig(num_nodes=N, d_llm=d_llm, seq_len=L, pred_len=H, channel=8, e_layer=1, d_layer=1, head=2,
                      dropout=0.0)
    return JointModel(make_model(cfg), lm, N)


def _grads(model: JointModel, x, y, prompts, w: float) -> dict[str, float]:
    model.train()
    model.zero_grad(set_to_none=True)
    mse = torch.nn.functional.mse_loss(model(x, prompts), y)
    (w * mse + (1 - w) * model.text_loss()).backward()
    return {n: float(p.grad.abs().sum()) if p.grad is not None else 0.0 for n, p in model.named_parameters()}


def test_lora_trains_only_the_adapters_and_the_weight_splits_the_loss(tiny_llm_dir):
    llm, prompts, x, y = _batch(tiny_llm_dir)
    model = _joint(tiny_llm_dir, "lora", llm.info.d_llm)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("forecaster.") or "lora_" in n for n in trainable)
    g = _grads(model, x, y, prompts, 0.5)
    lora = [n for n in trainable if "lora_B" in n]
    assert lora and all(g[n] > 0 for n in lora)  # gradients reach the adapters (B starts at zero: A's wait a step)
    assert all(g[n] == 0 for n in g if n not in trainable)
    # w = 1: the text loss has no say; w = 0: the forecast has none (the forecaster gets no gradient)
    only_fc = _grads(model, x, y, prompts, 1.0)
    only_text = _grads(model, x, y, prompts, 0.0)
    fc = [n for n in trainable if n.startswith("forecaster.")]
    assert sum(only_text[n] for n in fc) == 0 and sum(only_fc[n] for n in fc) > 0
    assert any(abs(only_fc[n] - only_text[n]) > 1e-9 for n in lora)


def test_full_trains_every_llm_weight(tiny_llm_dir):
    llm, prompts, x, y = _batch(tiny_llm_dir)
    model = _joint(tiny_llm_dir, "full", llm.info.d_llm)
    g = _grads(model, x, y, prompts, 0.5)
    llm_params = [n for n, p in model.named_parameters() if n.startswith("lm.")]
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("lm."))
    assert sum(g[n] > 0 for n in llm_params) > 0.9 * len(llm_params)


def test_merged_llm_embeds_as_the_adapted_one(tiny_llm_dir, tmp_path):
    llm, prompts, x, y = _batch(tiny_llm_dir)
    model = _joint(tiny_llm_dir, "lora", llm.info.d_llm)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # adapters away from their zero start
        _grads(model, x, y, prompts, 0.5)
        opt.step()
    model.eval()
    with torch.no_grad():
        adapted = model.embed(prompts)[1]
    _, tok = load_causal_lm(tiny_llm_dir, "lora", "pretrained", None)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")  # someone's own model folder is not ours to replace
    with pytest.raises(InputError, match="refusing to replace"):
        merge_and_save(model, tok, str(tmp_path / "mine"))
    assert [f.name for f in (tmp_path / "mine").iterdir()] == ["config.json"]
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".joint-llm-")]  # its temporary is gone
    merge_and_save(model, tok, str(tmp_path / "llm"))
    merged = load_llm(merge_and_save(model, tok, str(tmp_path / "llm")))  # and it replaces its own
    with torch.no_grad():
        out = merged.encoder(prompts.ids, prompts.mask)
    torch.testing.assert_close(out, adapted, atol=1e-5, rtol=0)
    assert merged.info.namespace != llm.info.namespace  # new weights, new store namespace


def test_encoder_only_llm_is_a_clear_error(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path / "bert")
    with pytest.raises(InputError, match="encoder-only"):
        load_causal_lm(str(tmp_path / "bert"), "full", "pretrained", None)


@pytest.mark.slow
def test_joint_lora_trains_exports_and_serves(tiny_llm_dir, small_run, tmp_path):
    """End to end, with the `log-values` template: the merged LLM is saved beside the checkpoint and recorded; the
    frozen run's store is refused for it; export (with its parity check, rendering the log-scaled prompts again) and
    serving take the result as any local LLM."""
    from timecma.core.store import EmbeddingStore
    from timecma.runtime import Forecaster

    data, frozen = small_run
    assert not (frozen / "llm").exists()  # the frozen path writes no LLM
    joint = tmp_path / "joint"
    r = run_cli("timecma.cli:train_cmd", "--data", str(data), "--llm", tiny_llm_dir, "--out", str(joint),
                "--joint", "lora", "--joint-weight", "0.5", "--template", "log-values", *TRAIN_ARGS)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((joint / "metrics.json").read_text())
    assert metrics["history"][0]["train_text_loss"] > 0 and metrics["history"][0]["train_forecast_mse"] > 0
    ckpt = torch.load(joint / "best.pt", weights_only=True)
    assert ckpt["llm"]["id"] == str(joint / "llm") and ckpt["llm"]["extra"]["joint"]["mode"] == "lora"
    assert not any(k.startswith(("lm.", "forecaster.")) for k in ckpt["state_dict"])
    frozen_llm = torch.load(frozen / "best.pt", weights_only=True)["llm"]
    made = metrics["training"]["llm"]  # how the LLM was made: fine-tuned, from which base (its digest)
    assert made == {"made": "joint-lora", "from": os.path.basename(tiny_llm_dir), "init": "pretrained",
                    "layers": None, "from_weights_digest": frozen_llm["weights_digest"],
                    "weights_digest": ckpt["llm"]["weights_digest"]}
    record = json.loads((joint / "llm" / "timecma-joint-llm.json").read_text())  # the folder says how it was made
    assert record["made_by"] == "timecma-train --joint" and record["mode"] == "lora"
    assert made["weights_digest"] != made["from_weights_digest"]
    with pytest.raises(InputError, match="Use a different store directory"):
        EmbeddingStore(str(frozen / "store"), ckpt["llm"]["namespace"], ckpt["llm"]["d_llm"])
    r = run_cli("timecma.export.cli:export_cmd", "--ckpt", str(joint / "best.pt"), "--openvino", "skip",
                "--tensorrt", "skip")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((joint / "bundle" / "manifest.json").read_text())
    assert manifest["prompt"]["name"] == "log-values" and len(manifest["prompt"]["log_scaler"]["offset"]) == 3
    assert manifest["metrics"]["training"]["llm"] == made and manifest["metrics"]["training"]["recipe"] == \
        "timecma-reference"
    window = pd.read_csv(data, parse_dates=["date"]).iloc[-24:]
    with Forecaster.load(str(joint / "bundle"), backend="ort-cpu") as f:
        assert f.manifest.llm.namespace == ckpt["llm"]["namespace"]
        assert "." in f.renderer.render_window(window[f.variables].to_numpy(), window.date.to_numpy())[0]
        assert np.isfinite(f.predict(window)).all()
