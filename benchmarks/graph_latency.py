"""Batch-1 latency of each bundle graph on ONNX Runtime CPU next to eager PyTorch (same weights,
same real ETTh1 inputs). One line per graph; the full harness is timecma-bench.

    python -m benchmarks.graph_latency --bundle runs/demo/etth1/bundle --ckpt runs/demo/etth1/best.pt
"""

from __future__ import annotations

import json
import os
import statistics
import time

import click
import numpy as np
import onnxruntime as ort
import torch

from timecma.checkpoint import build_model, load_checkpoint
from timecma.config import ModelConfig
from timecma.data import load_series
from timecma.llm import load_llm
from timecma.manifest import read_manifest
from timecma.prompts import PromptRenderer, get_template
from timecma.tokens import encode_prompts, pad_right


def _median_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


@click.command()
@click.option("--bundle", required=True)
@click.option("--ckpt", required=True)
@click.option("--iters", default=20, show_default=True)
@click.option("--out", default=None, help="Write the lines as JSON here.")
def main(bundle: str, ckpt: str, iters: int, out: str | None) -> None:
    m = read_manifest(bundle)
    c = load_checkpoint(ckpt)
    llm = load_llm(c["llm"]["id"])
    series = load_series(c["data"]["source"])
    cfg = ModelConfig(**c["model_config"])
    renderer = PromptRenderer(get_template("reference"), series.frequency)
    start = len(series.values) - cfg.seq_len
    ids = encode_prompts(llm.backend, renderer.render_series(series.values, series.timestamps, [start], cfg.seq_len))
    a, mask = pad_right(ids, llm.info.pad_id)
    res = {}
    opts = ort.SessionOptions()
    for variant, info in m["graphs"]["llm"]["files"].items():
        if variant == "fp16":
            continue
        s = ort.InferenceSession(os.path.join(bundle, info["file"]), opts, providers=["CPUExecutionProvider"])
        res[f"llm ort-cpu {variant}"] = _median_ms(lambda: s.run(None, {"input_ids": a, "attention_mask": mask}), 2, iters)
    ta, tm = torch.from_numpy(a), torch.from_numpy(mask)
    with torch.inference_mode():
        res["llm torch eager fp32"] = _median_ms(lambda: llm.encoder(ta, tm), 2, iters)
        emb = llm.encoder(ta, tm).numpy()[None]
    x = series.values[start:].astype(np.float32)[None]
    s = ort.InferenceSession(os.path.join(bundle, m["graphs"]["forecaster"]["files"]["fp32"]["file"]), opts,
                             providers=["CPUExecutionProvider"])
    res["forecaster ort-cpu fp32"] = _median_ms(lambda: s.run(None, {"x": x, "prompt_emb": emb}), 5, iters * 5)
    model = build_model(cfg, c["state_dict"])
    tx, te = torch.from_numpy(x), torch.from_numpy(emb)
    with torch.inference_mode():
        res["forecaster torch eager fp32"] = _median_ms(lambda: model(tx, te), 5, iters * 5)
    tokens = int(mask.sum())
    for k, v in res.items():
        click.echo(f"{k:32s} {v:9.2f} ms  (batch 1 window: {len(ids)} prompts, {tokens} tokens)")
    if out:
        with open(out, "w") as f:
            json.dump({"bundle": bundle, "prompts": len(ids), "tokens": tokens, "median_ms": res,
                       "torch_threads": torch.get_num_threads()}, f, indent=2)


if __name__ == "__main__":
    main()
