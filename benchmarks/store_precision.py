"""What storing prompt embeddings in float16 does to forecasts: the same test windows forecast from
float32 and from float16-rounded embeddings (ONNX Runtime CPU), test MSE of both and the largest
change, in the paper's units.

    python -m benchmarks.store_precision --bundle runs/ablation/timecma/bundle --llm runs/demo/tiny-llm \
        --out benchmarks/results/store-fp16.json
"""

from __future__ import annotations

import json

import click
import numpy as np

from timecma.core.manifest import read_manifest
from timecma.core.prompts import PromptRenderer
from timecma.core.tokens import encode_prompts
from timecma.runtime import make_backend


@click.command()
@click.option("--bundle", required=True)
@click.option("--llm", "llm_id", required=True, help="The LLM the bundle was exported with.")
@click.option("--data", default="timecma/datasets/ETTh1.csv", show_default=True)
@click.option("--windows", default=200, show_default=True)
@click.option("--out", required=True)
def main(bundle: str, llm_id: str, data: str, windows: int, out: str) -> None:
    from timecma.data import load_series, make_windows, split_borders
    from timecma.llm import encode_last_token, load_llm

    m = read_manifest(bundle)
    cfg = m.model_config
    s = load_series(data, m.data.time_col)
    b = split_borders(len(s.values), cfg.seq_len, m.data.info.get("split", "ett"), s.frequency)
    starts = make_windows(b, cfg.seq_len, cfg.pred_len)["test"].starts
    starts = starts[np.linspace(0, len(starts) - 1, min(windows, len(starts))).astype(int)]
    llm = load_llm(llm_id)
    if m.prompt is None:
        raise click.UsageError(f"{bundle}: its model has no LLM branch, so no prompt embeddings to store")
    renderer = PromptRenderer.from_record(m.prompt, s.frequency)
    be = make_backend("ort-cpu", bundle, m)
    train = s.values[b["train"][0]:b["train"][1]]
    mean, std = train.mean(axis=0), train.std(axis=0)
    sq: dict[str, list[float]] = {"float32": [], "float16": []}
    worst = 0.0
    for s0 in starts:
        ids = encode_prompts(llm.backend, renderer.render_series(s.values, s.timestamps, [s0], cfg.seq_len))
        emb = encode_last_token(llm, ids)[None]
        x = s.values[s0:s0 + cfg.seq_len][None]
        truth = (s.values[s0 + cfg.seq_len:s0 + cfg.seq_len + cfg.pred_len] - mean) / std
        y32 = (be.run_forecaster(x, emb)[0] - mean) / std
        y16 = (be.run_forecaster(x, emb.astype(np.float16).astype(np.float32))[0] - mean) / std
        sq["float32"].append(np.mean((y32 - truth) ** 2))
        sq["float16"].append(np.mean((y16 - truth) ** 2))
        worst = max(worst, float(np.abs(y16 - y32).max()))
    mse = {k: float(np.mean(v)) for k, v in sq.items()}
    res = {"bundle_model": cfg.model, "d_llm": cfg.d_llm, "windows": len(starts), "test_mse": mse,
           "mse_rel_change": abs(mse["float16"] - mse["float32"]) / mse["float32"],
           "max_abs_forecast_change_normalised": worst}
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    click.echo(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
