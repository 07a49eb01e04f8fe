"""Every LLM variant a bundle can hold, judged on a real pretrained LLM's weights (SmolLM2-135M).

    python -m benchmarks.real_llm_variants --llm runs/llm/smollm2 --out benchmarks/results/real-llm-variants-smollm2

For each variant: the embedding error against eager PyTorch fp32 on real ETTh1 validation prompts
(relative L2 per prompt, the measure every gate uses; ``timecma.core.accuracy``), the largest
|output| (a graph that returns zeros is caught here), and the latency of one window's prompts
(N = 7, batch 1). The fp16 rows are the graph TensorRT would compile, run on ONNX Runtime CPU:
onnxruntime's own float16 converter (what bundles held before) and timecma's recipe (weight
matmuls in fp16, the rest fp32). No forecaster is involved: a forecast-based gate on a random
forecaster proves nothing about the LLM stage.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import click
import numpy as np

from timecma.core.accuracy import EMBEDDING_GATE, embedding_errors
from timecma.core.timing import time_calls

from .machine import machine_info


def _onnxruntime_fp16(src: str, dst: str) -> None:
    """onnxruntime's float16 converter with the block list timecma used before (kept here to measure it)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(onnx.load(src), keep_io_types=True, op_block_list=[
        "LayerNormalization", "Softmax", "Pow", "ReduceMean", "Sqrt", "Div", "Erf", "GatherElements", "Range",
        "CumSum", "ReduceSum"])
    wrapped = OnnxModel(model)
    wrapped.topological_sort()
    onnx.save(wrapped.model, dst)


def _prompts(llm, data: str, windows: int):
    from timecma.core.prompts import PromptRenderer, get_template
    from timecma.core.tokens import encode_prompts
    from timecma.data import load_series, make_windows, resolve_split, split_borders

    series = load_series(data, "date")
    borders = split_borders(len(series.values), 96, resolve_split("auto", data), series.frequency)
    starts = make_windows(borders, 96, 96)["val"].starts
    starts = starts[np.linspace(0, len(starts) - 1, windows).astype(int)]
    renderer = PromptRenderer(get_template("reference"), series.frequency)
    return encode_prompts(llm.backend, renderer.render_series(series.values, series.timestamps, starts, 96))


@click.command()
@click.option("--llm", "llm_dir", required=True, help="A model directory (timecma-llm fetch-smollm2).")
@click.option("--layers", type=int, default=None, help="First K decoder layers (default: all).")
@click.option("--data", default="timecma/datasets/ETTh1.csv", show_default=True)
@click.option("--windows", default=2, show_default=True, help="Validation windows (x 7 prompts each).")
@click.option("--out", required=True)
def main(llm_dir: str, layers: int | None, data: str, windows: int, out: str) -> None:
    import torch

    from timecma.core.tokens import llm_feeds
    from timecma.export.onnx_export import convert_fp16, export_llm, quantize_int8
    from timecma.llm import encode_last_token, load_llm
    from timecma.runtime.backends.openvino import graph_runner
    from timecma.runtime.backends.ort import ort_session
    from timecma.runtime.compile.openvino import compress_int8, quantize_w8a8

    os.makedirs(out, exist_ok=True)
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    llm = load_llm(llm_dir, layers=layers, last_position_only=False)
    n = 7
    ids = _prompts(llm, data, windows + 2)
    calibration = [llm_feeds([i], llm.info.pad_id) for i in ids[windows * n:]]  # w8a8: 2 other windows' prompts
    ids = ids[:windows * n]
    windows_ids = [ids[i * n:(i + 1) * n] for i in range(len(ids) // n)]
    feeds = [llm_feeds(w, llm.info.pad_id) for w in windows_ids]
    ref = np.concatenate([encode_last_token(llm, w) for w in windows_ids])
    rows: dict[str, dict] = {}

    def record(name: str, run, note: str = "") -> None:
        emb = np.concatenate([run(f) for f in feeds])
        ms, _ = time_calls(lambda k: run(feeds[0]), 3, warmup=1, budget_s=60)
        rows[name] = {**embedding_errors(emb, ref), "max_abs_output": float(np.abs(emb).max()),
                      "p50_ms_window": float(np.median(ms)), "note": note,
                      "within_embedding_gate": bool(embedding_errors(emb, ref)["prompt_rel_l2_max"] < EMBEDDING_GATE)}
        click.echo(f"{name:34s} worst prompt {rows[name]['prompt_rel_l2_max']:.2e}  max|out| "
                   f"{rows[name]['max_abs_output']:8.2f}  {rows[name]['p50_ms_window']:8.1f} ms", err=True)

    record("eager PyTorch fp32 (reference)", lambda f: encode_last_token(llm, [np.asarray(r[:m.sum()]) for r, m in
                                                                           zip(f["input_ids"], f["attention_mask"])]))
    bf16 = load_llm(llm_dir, layers=layers, last_position_only=False)
    bf16.encoder.to(torch.bfloat16)

    def eager_bf16(f):
        with torch.inference_mode():
            return bf16.encoder(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])).float().numpy()

    record("eager PyTorch bf16", eager_bf16)
    f32 = os.path.join(work, "llm.onnx")
    t = time.time()
    export_llm(llm.encoder, f32, llm.info.max_positions)
    export_s = time.time() - t
    record("ONNX Runtime fp32", lambda f, s=ort_session(f32): s.run(None, f)[0])
    q8 = os.path.join(work, "llm.int8.onnx")
    quantize_int8(f32, q8)
    record("ONNX Runtime int8 (dynamic)", lambda f, s=ort_session(q8): s.run(None, f)[0])
    old16 = os.path.join(work, "llm.fp16-ort-converter.onnx")
    _onnxruntime_fp16(f32, old16)
    record("fp16, onnxruntime converter (before)", lambda f, s=ort_session(old16): s.run(None, f)[0],
           "the graph bundles held before this change; ORT CPU")
    new16 = os.path.join(work, "llm.fp16.onnx")
    calibration = [llm_feeds([i], llm.info.pad_id) for i in ids[:n]]
    conversion = convert_fp16(f32, new16, calibration)
    record("fp16, timecma recipe (now)", lambda f, s=ort_session(new16): s.run(None, f)[0],
           f"weight matmuls fp16 ({conversion['fp16_matmuls']}/{conversion['matmuls']}); ORT CPU")
    ov_int8, ov_w8a8 = os.path.join(work, "llm.int8.xml"), os.path.join(work, "llm.w8a8.xml")
    compress_int8(f32, ov_int8)
    quantize_w8a8(f32, ov_w8a8, calibration)
    for label, path, prec in (("OpenVINO f32", f32, "f32"), ("OpenVINO bf16", f32, "bf16"),
                              ("OpenVINO int8 weights", ov_int8, "int8"),
                              ("OpenVINO w8a8 (static int8, SmoothQuant)", ov_w8a8, "w8a8")):
        try:
            run = graph_runner(path, prec, None)
        except Exception as exc:  # bf16 on a CPU without it, for one
            rows[label] = {"not_measured": str(exc)[:200]}
            continue
        record(label, run)
    res = {"llm": os.path.basename(os.path.normpath(llm_dir)), "gguf": llm.info.extra.get("gguf"),
           "layers": llm.info.extra["layers"], "model_layers": llm.info.extra["model_layers"],
           "prompts": len(ids), "prompt_tokens": [int(len(i)) for i in ids], "embedding_gate": EMBEDDING_GATE,
           "llm_export_seconds": round(export_s, 1), "fp16_conversion": conversion, "machine": machine_info(),
           "variants": rows}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    lines = [f"# LLM variants on real weights: {res['llm']} ({res['layers']} of {res['model_layers']} layers)", "",
             f"{res['prompts']} real ETTh1 validation prompts ({min(res['prompt_tokens'])}-{max(res['prompt_tokens'])} "
             f"tokens), error against eager PyTorch fp32; latency: one window's 7 prompts, batch 1.", "",
             f"Machine: {res['machine'].get('cpu')}, {res['machine'].get('cores')} cores, "
             f"ISA {', '.join(res['machine'].get('isa', []))}; {res['machine']['date']}.", "",
             "| variant | worst prompt rel. L2 | median | max abs output | p50 ms | within 5% gate |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "not_measured" in r:
            lines.append(f"| {name} | not measured: {r['not_measured']} | | | | |")
            continue
        lines.append(f"| {name} | {r['prompt_rel_l2_max']:.2e} | {r['prompt_rel_l2_median']:.2e} | "
                     f"{r['max_abs_output']:.2f} | {r['p50_ms_window']:.1f} | {'yes' if r['within_embedding_gate'] else 'NO'} |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
