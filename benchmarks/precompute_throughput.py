"""Embedding precompute throughput: batched + length-bucketed (timecma) vs one prompt at a
time (as the public reference's gen_prompt_emb does), same LLM, same ETTh1 prompts.

    python -m benchmarks.precompute_throughput --llm runs/gpt2-size --n-prompts 224 --out benchmarks/results
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import click
import numpy as np
import torch

from timecma.data import load_series
from timecma.llm import encode_last_token, load_llm
from timecma.prompts import PromptRenderer, get_template
from timecma.tokens import encode_prompts, length_batches

ETTH1 = Path(__file__).resolve().parents[1] / "timecma" / "data" / "ETTh1.csv"


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def measure(llm, ids: list[np.ndarray], batch_size: int) -> dict:
    """Embed all prompts once (after one warm-up batch) and time it."""
    batches = [[i] for i in range(len(ids))] if batch_size == 1 else length_batches(ids, batch_size)
    encode_last_token(llm, [ids[i] for i in batches[0]])  # warm-up
    t = time.perf_counter()
    for b in batches:
        encode_last_token(llm, [ids[i] for i in b])
    s = time.perf_counter() - t
    tokens = int(sum(len(i) for i in ids))
    return {"batch_size": batch_size, "prompts": len(ids), "tokens": tokens, "seconds": s,
            "prompts_per_s": len(ids) / s, "tokens_per_s": tokens / s}


@click.command()
@click.option("--llm", "llm_dir", required=True, help="LLM directory (e.g. `timecma-tiny-llm --preset gpt2-size DIR`).")
@click.option("--n-prompts", default=224, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--out", "out_dir", default="benchmarks/results", show_default=True)
@click.option("--name", default=None, help="Result file stem [default: precompute_<llm dir name>].")
def main(llm_dir: str, n_prompts: int, batch_size: int, out_dir: str, name: str | None) -> None:
    series = load_series(ETTH1)
    renderer = PromptRenderer(get_template("reference"), series.frequency)
    starts = range(0, n_prompts // len(series.variables) + 1)
    prompts = renderer.render_series(series.values, series.timestamps, starts, 96)[:n_prompts]
    llm = load_llm(llm_dir)
    ids = encode_prompts(llm.backend, prompts)
    one = measure(llm, ids, 1)
    batched = measure(llm, ids, batch_size)
    result = {
        "benchmark": "precompute_throughput",
        "llm": llm_dir, "d_llm": llm.info.d_llm,
        "n_layer": getattr(llm.encoder.model.config, "n_layer", None),
        "mean_tokens": float(np.mean([len(i) for i in ids])),
        "one_at_a_time": one, "batched": batched,
        "speedup": batched["prompts_per_s"] / one["prompts_per_s"],
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    os.makedirs(out_dir, exist_ok=True)
    stem = name or f"precompute_{Path(llm_dir).name}"
    Path(out_dir, f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = (f"# Precompute throughput: {stem}\n\nLLM `{llm_dir}` (d={llm.info.d_llm}, {result['n_layer']} layers), "
          f"{len(ids)} ETTh1 prompts, mean {result['mean_tokens']:.0f} tokens, {result['machine']['cpu']}, "
          f"{result['machine']['torch_threads']} threads, torch {torch.__version__}, {result['date']}.\n\n"
          "| mode | prompts/s | tokens/s | seconds |\n|---|---|---|---|\n"
          f"| one at a time (reference) | {one['prompts_per_s']:.1f} | {one['tokens_per_s']:.0f} | {one['seconds']:.2f} |\n"
          f"| batched {batch_size}, length-bucketed | {batched['prompts_per_s']:.1f} | {batched['tokens_per_s']:.0f} "
          f"| {batched['seconds']:.2f} |\n\nSpeed-up: {result['speedup']:.2f}x\n")
    Path(out_dir, f"{stem}.md").write_text(md)
    click.echo(md)


if __name__ == "__main__":
    main()
