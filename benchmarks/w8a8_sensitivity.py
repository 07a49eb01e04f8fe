"""How far each int8 step moves SmolLM2's embeddings, and whether a few outlier layers make its w8a8 fail
its gate: int8 weights alone (f32 and bf16 compute), with OpenVINO's dynamic int8 activations, then w8a8
with the linears of largest activation peaks kept float.

    python -m benchmarks.w8a8_sensitivity --bundle runs/smollm2-ckpt/bundle --keep 0,2,8 \\
        --out benchmarks/results/w8a8-sensitivity-smollm2

The int8-weight rows compile NNCF's weight-compressed graph (what `openvino:int8` serves) with OpenVINO's
dynamic activation quantisation off (``DYNAMIC_QUANTIZATION_GROUP_SIZE`` 0: the weights' own error) and at
its default group of 32 (int8 VNNI compute, per-token groups of 32 activations). Then it ranks every
constant-weight MatMul by its input's peak / median |activation| on the w8a8 calibration
prompts (fp32), then quantises with the top-k of them float (besides the attention's activation x
activation MatMuls, as export does) and reports the gate's embedding error on every gate prompt and the
latency of one window's prompts, next to OpenVINO bf16.
"""

from __future__ import annotations

import tempfile
import time

import click
import numpy as np

from timecma.core.manifest import read_manifest
from timecma.runtime.backends.openvino import compiled_runner, compute_precision, ov_module
from timecma.runtime.compile.openvino import _Gate, activation_matmuls, calibration_feeds, compress_int8, nncf_w8a8

from .machine import machine_info, machine_line, write_results


def _judge(ref, core, path: str, compute: str, dynamic_group: int | None = None) -> dict:
    """Embedding errors on every gate prompt and one window's latency, the graph compiled without a cache
    (the runtime's cache would keep a 135 MB blob per temporary graph)."""
    cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": compute}
    if dynamic_group is not None:
        cfg["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = str(dynamic_group)
    _, err, ms = ref.judge_llm(compiled_runner(core.compile_model(path, "CPU", cfg)), budget_s=20)
    return {**err, "window_ms_p50": float(np.median(ms))}


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--keep", default="0,2,8", show_default=True, help="numbers of outlier linears kept float")
@click.option("--out", required=True)
def main(bundle: str, keep: str, out: str) -> None:
    ov = ov_module()
    core = ov.Core()
    manifest = read_manifest(bundle)
    src = f"{bundle}/{manifest.graphs['llm'].files['fp32'].file}"
    ref = _Gate(bundle, manifest, None)
    cal = calibration_feeds(ref.ids, ref.mask, ref.n)
    model = core.read_model(src)
    attention = activation_matmuls(model)
    weighted = [op for op in model.get_ordered_ops()
                if op.get_type_name() == "MatMul" and op.get_friendly_name() not in attention]
    model.add_outputs([op.inputs()[0].get_source_output() for op in weighted])
    probe = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    peak, ratio = np.zeros(len(weighted)), np.zeros(len(weighted))
    for feed in cal:
        for j, v in enumerate(list(probe(feed).values())[-len(weighted):]):
            a = np.abs(v).reshape(-1, v.shape[-1])
            peak[j], ratio[j] = max(peak[j], a.max()), max(ratio[j], a.max() / (np.median(a) + 1e-9))
    order = np.argsort(-ratio)
    names = [op.get_friendly_name() for op in weighted]
    rows = [{"variant": "bf16", **_judge(ref, core, src, "bf16")}]
    with tempfile.TemporaryDirectory(prefix="timecma-int8-") as graphs:  # 135 MB a graph: not in results
        int8 = f"{graphs}/llm.int8.xml"
        compress_int8(src, int8)
        for compute, group, what in (("f32", 0, "int8 weights, f32 compute"),
                                     ("bf16", 0, "int8 weights, bf16 compute"),
                                     ("bf16", 32, "int8 weights, dynamic int8 activations (group 32)")):
            rows.append({"variant": what, **_judge(ref, core, int8, compute, group)})
        for k in (int(s) for s in keep.split(",")):
            t = time.time()
            dest = f"{graphs}/llm.w8a8.top{k}.xml"
            ov.save_model(nncf_w8a8(core.read_model(src), cal, attention + [names[j] for j in order[:k]]), dest,
                          compress_to_fp16=False)
            rows.append({"variant": f"w8a8, {k} outlier linears float", "quantise_s": time.time() - t,
                         **_judge(ref, core, dest, compute_precision("w8a8"))})
    res = {"machine": machine_info(), "bundle": bundle, "rows": rows,
           "outliers": [{"linear": names[j], "peak": float(peak[j]), "peak_over_median": float(ratio[j])}
                        for j in order[:15]]}
    lines = ["# int8 on SmolLM2: weights alone, dynamic activations, w8a8 with outlier linears kept float", "",
             machine_line(res["machine"]), "",
             "| variant | worst prompt embedding error | median | one window, ms p50 |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['prompt_rel_l2_max']:.4f} | {r['prompt_rel_l2_median']:.4f} | "
              f"{r['window_ms_p50']:.0f} |" for r in rows]
    lines += ["", "Largest input peak / median |activation| (calibration prompts, fp32): " + ", ".join(
        f"{o['linear']} {o['peak']:.0f} ({o['peak_over_median']:.0f}x)" for o in res["outliers"][:8])]
    write_results(out, res, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
