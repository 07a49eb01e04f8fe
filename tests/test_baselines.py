"""Baselines in the same toolkit: timecma-no-llm (the network without its prompt branch) and
DLinear train, export and serve with the same commands; their bundles have no LLM, tokenizer
or store."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import TRAIN_ARGS, make_frame, run_cli
from timecma.checkpoint import load_checkpoint
from timecma.core.config import ModelConfig
from timecma.core.manifest import read_manifest
from timecma.model import DLinear, TimeCMA

BLOCK = ("import sys\n"
         "class Block:\n"
         "    def find_spec(self, name, path=None, target=None):\n"
         "        if name.split('.')[0] in ('torch', 'transformers', 'pandas'):\n"
         "            raise ModuleNotFoundError(f'blocked: {name}')\n"
         "sys.meta_path.insert(0, Block())\n")


@pytest.fixture(scope="module", params=["timecma-no-llm", "dlinear"])
def baseline(request, small_run, tmp_path_factory):
    data, _ = small_run
    out = tmp_path_factory.mktemp(request.param)
    r = run_cli("timecma.cli:train_cmd", "--data", str(data), "--out", str(out / "run"), "--model", request.param,
                *TRAIN_ARGS)
    assert r.returncode == 0, r.stderr
    r = run_cli("timecma.export.cli:export_cmd", "--ckpt", str(out / "run" / "best.pt"), "--parity-windows", "3")
    assert r.returncode == 0, r.stderr
    return request.param, data, out / "run"


def test_baseline_checkpoint_and_bundle_have_no_llm(baseline):
    name, _, run = baseline
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["model_config"]["model"] == name and ckpt["llm"] is None and ckpt["prompt"] is None
    assert not (run / "store").exists()  # no LLM, no embeddings
    assert not any(k.startswith(("prompt_encoder.", "cross.")) for k in ckpt["state_dict"])
    m = read_manifest(run / "bundle")
    assert m.llm is None and m.tokenizer is None and m.prompt is None and set(m.graphs) == {"forecaster"}
    assert set(m.graphs["forecaster"].inputs) == {"x"}
    assert not (run / "bundle" / "tokenizer").exists() and not (run / "bundle" / "llm_last_token.onnx").exists()
    assert [e.graph for e in m.engines] == ["forecaster"] and m.engines[0].network["inputs"].keys() == {"x"}
    par = m.graphs["forecaster"].info["parity_vs_torch"]["ort_cpu_fp32"]
    assert max(v["max_abs"] for v in par.values()) <= 1e-4


def test_baseline_serves_without_torch_tokenization_or_store(baseline, tmp_path):
    name, _, run = baseline
    frame = make_frame(120, seed=8)
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), inp)
    out = tmp_path / "out.parquet"
    code = BLOCK + "from timecma.runtime.serving.batch_cli import serve_batch_cmd\nserve_batch_cmd()"
    r = subprocess.run([sys.executable, "-c", code, str(inp), "--bundle", str(run / "bundle"), "--out", str(out),
                        "--mode", "rolling", "--stride", "12", "--store", str(tmp_path / "store")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "store hits 0 / misses 0" in r.stdout and not (tmp_path / "store").exists()
    table = pq.read_table(out)
    assert table.num_rows == ((120 - 24) // 12 + 1) * 12

    from timecma.runtime import Forecaster

    window = frame.iloc[:24]
    ort = Forecaster.load(str(run / "bundle"), backend="ort-cpu").predict(window)
    eager = Forecaster.load(str(run / "bundle"), backend="torch").predict(window)
    scale = make_frame(500)[["v0", "v1", "v2"]].to_numpy().std(axis=0)
    assert (np.abs(ort - eager) / scale).max() <= 1e-4  # the exported graph is the model


def test_no_llm_network_is_timecma_without_its_prompt_branch():
    cfg = dict(num_nodes=3, seq_len=24, pred_len=12, d_llm=32, channel=16, e_layer=1, d_layer=1)
    full = TimeCMA(ModelConfig(**cfg)).state_dict()
    bare = TimeCMA(ModelConfig(**{**cfg, "d_llm": 0}, model="timecma-no-llm")).state_dict()
    assert set(bare) == {k for k in full if not k.startswith(("prompt_encoder.", "cross."))}
    assert all(bare[k].shape == full[k].shape for k in bare)


def test_dlinear_is_decomposition_plus_two_linear_maps():
    torch.manual_seed(0)
    m = DLinear(ModelConfig(num_nodes=2, seq_len=30, pred_len=6, model="dlinear", moving_avg=5)).eval()
    x = torch.randn(3, 30, 2)
    # the trend is a centred moving average over an edge-padded window
    padded = np.concatenate([np.repeat(x[:, :1].numpy(), 2, 1), x.numpy(), np.repeat(x[:, -1:].numpy(), 2, 1)], 1)
    trend = np.stack([padded[:, i:i + 5].mean(1) for i in range(30)], 1)
    seasonal = x.numpy() - trend
    ws, bs = m.linear_seasonal.weight.detach().numpy(), m.linear_seasonal.bias.detach().numpy()
    wt, bt = m.linear_trend.weight.detach().numpy(), m.linear_trend.bias.detach().numpy()
    expected = (np.einsum("pl,bln->bpn", ws, seasonal) + bs[None, :, None]
                + np.einsum("pl,bln->bpn", wt, trend) + bt[None, :, None])
    with torch.no_grad():
        np.testing.assert_allclose(m(x).numpy(), expected, atol=1e-5)
    assert sum(p.numel() for p in m.parameters()) == 2 * (30 * 6 + 6)


def test_unknown_model_is_refused(small_run, tmp_path):
    data, _ = small_run
    r = run_cli("timecma.cli:train_cmd", "--data", str(data), "--out", str(tmp_path / "x"), "--model", "lstm",
                *TRAIN_ARGS)
    assert r.returncode == 2 and "lstm" in r.stderr and not (tmp_path / "x").exists()
