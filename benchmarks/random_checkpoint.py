"""A checkpoint with randomly initialised forecaster weights for a given LLM (for benchmarks).

Latency does not depend on weight values, so a GPT-2-size bundle can be measured without
embedding 100k prompts for training first. The data contract comes from a real file.

    python -m benchmarks.random_checkpoint --llm runs/gpt2-size --data timecma/datasets/ETTh1.csv --out runs/gpt2-size-ckpt/best.pt
"""

from __future__ import annotations

import os

import click
import torch

from timecma.checkpoint import save_checkpoint
from timecma.core.config import DataContract, ModelConfig
from timecma.core.scaling import Scaler
from timecma.data import load_series, resolve_split, split_borders
from timecma.llm import load_llm
from timecma.model import TimeCMA
from timecma.core.prompts import get_template


@click.command()
@click.option("--llm", "llm_id", required=True)
@click.option("--data", "data_path", required=True)
@click.option("--out", required=True)
@click.option("--seq-len", default=96, show_default=True)
@click.option("--pred-len", default=96, show_default=True)
@click.option("--channel", default=32, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(llm_id: str, data_path: str, out: str, seq_len: int, pred_len: int, channel: int, seed: int) -> None:
    llm = load_llm(llm_id)
    series = load_series(data_path)
    split = resolve_split("auto", data_path)
    b = split_borders(len(series.values), seq_len, split, series.frequency)["train"]
    scaler = Scaler.fit(series.values[b[0]:b[1]], series.variables)
    cfg = ModelConfig(num_nodes=len(series.variables), seq_len=seq_len, pred_len=pred_len, d_llm=llm.info.d_llm,
                      channel=channel)
    torch.manual_seed(seed)
    model = TimeCMA(cfg)
    tmpl = get_template("reference")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_checkpoint(out, {
        "state_dict": model.state_dict(), "model_config": cfg.to_dict(),
        "data": DataContract("date", series.variables, series.frequency, seq_len, pred_len, scaler.mean.tolist(),
                             scaler.std.tolist(), split, os.path.abspath(data_path)).to_dict(),
        "prompt": {"name": tmpl.name, "hash": tmpl.hash}, "llm": llm.info.to_dict(),
        "metrics": {"note": "random forecaster weights, for latency benchmarks only"},
    })
    click.echo(f"wrote {out} (random forecaster weights; benchmarks only)")


if __name__ == "__main__":
    main()
