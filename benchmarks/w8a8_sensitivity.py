"""How far each int8 step moves SmolLM2's embeddings, and whether a few outlier layers make its w8a8 fail
its gate: int8 weights alone (f32 and bf16 compute), with OpenVINO's dynamic int8 activations, the
activations alone (on weights that lose nothing), then w8a8 with the linears of largest activation peaks
kept float.

    python -m benchmarks.w8a8_sensitivity --bundle runs/smollm2-ckpt/bundle --keep 0,2,8 \\
        --out benchmarks/results/w8a8-sensitivity-smollm2

The int8-weight rows compile NNCF's weight-compressed graph (what `openvino:int8` serves) with OpenVINO's
dynamic activation quantisation off (``DYNAMIC_QUANTIZATION_GROUP_SIZE`` 0: the weights' own error) and at
its default group of 32 (int8 VNNI compute, per-token groups of 32 activations). The activations' own
share: a GGUF-sourced LLM's linears hold 16 levels per group of 32 inputs (Q4_1), which
``lossless_u4`` rebuilds exactly as OpenVINO's compressed 4-bit weights, so that graph in f32 equals the
fp32 one and with dynamic quantisation on only the int8 activations move it. Then it ranks every
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
from timecma.runtime.compile.gate import GateReference
from timecma.runtime.compile.openvino import activation_matmuls, calibration_feeds, compress_int8, nncf_w8a8

from .machine import machine_info, machine_line, write_results


def lossless_u4(model, group: int = 32) -> int:
    """Rebuild every constant-weight MatMul whose weights hold at most 16 evenly spaced levels per group of
    ``group`` inputs (a Q4_1 GGUF's linears) as u4 weights with an integer zero point and a per-group scale
    (the pattern OpenVINO runs with int8 dynamic quantisation) plus each group's offset through the group
    sums of the input, which together equal the original weights; returns how many were rebuilt (in place).
    A layer off the grid is left float."""
    ov = ov_module()
    ops = ov.opset13
    done = 0
    for op in [op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]:
        const = op.input_value(1).get_node()
        if const.get_type_name() != "Constant" or op.get_attributes()["transpose_b"]:
            continue
        w = const.get_data().astype(np.float32).T  # [out, in]
        o, i = w.shape
        if i % group:
            continue
        g = w.reshape(o, i // group, group)
        lo = g.min(-1, keepdims=True)
        step = (g.max(-1, keepdims=True) - lo) / 15
        step[step == 0] = 1
        q = np.rint((g - lo) / step)
        if np.abs((q - 8) * step + (lo + 8 * step) - g).max() > 1e-6 * np.abs(g).max():
            continue
        # w = (q - 8) step + (lo + 8 step), so x.w = x.((q - 8) step) + sum over each group of x, times its offset
        zero = ops.convert(ops.constant(np.full((o, i // group, 1), 8, np.uint8), dtype=ov.Type.u4), ov.Type.f32)
        levels = ops.convert(ops.constant(q.astype(np.uint8), dtype=ov.Type.u4), ov.Type.f32)
        weights = ops.reshape(ops.multiply(ops.subtract(levels, zero), ops.constant(step.astype(np.float32))),
                              ops.constant(np.array([o, i], np.int64)), False)
        x = op.input_value(0)
        lead = ops.slice(ops.shape_of(x), ops.constant([0]), ops.constant([-1]), ops.constant([1]))
        sums = ops.reduce_sum(ops.reshape(x, ops.concat([lead, ops.constant(np.array([i // group, group]))], 0),
                                          False), ops.constant([-1]), False)
        offset = np.ascontiguousarray((lo + 8 * step)[..., 0].T, np.float32)  # [in / group, out]
        out = ops.add(ops.matmul(x, weights, False, True), ops.matmul(sums, ops.constant(offset), False, False))
        for t in op.output(0).get_target_inputs():
            t.replace_source_output(out.output(0))
        done += 1
    return done


def _judge(ref, core, path: str, compute: str, dynamic_group: int | None = None) -> dict:
    """Embedding errors on every gate prompt and one window's latency, the graph compiled without a cache
    (the runtime's cache would keep a 135 MB blob per temporary graph)."""
    cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": compute}
    if dynamic_group is not None:
        cfg["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = str(dynamic_group)
    _, err, ms = ref.judge_llm(compiled_runner(core.compile_model(path, "CPU", cfg)), budget_s=20)
    return {**err, "window_ms_p50": float(np.median(ms))}


def _markdown(res: dict) -> list[str]:
    """The results table (errors to 3 significant figures: the lossless rows sit near 1e-6)."""
    rows = res["rows"]
    lines = ["# int8 on SmolLM2: weights alone, dynamic activations, w8a8 with outlier linears kept float", "",
             machine_line(res["machine"]), "",
             "| variant | worst prompt embedding error | median | one window, ms p50 |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['prompt_rel_l2_max']:.3g} | {r['prompt_rel_l2_median']:.3g} | "
              f"{r['window_ms_p50']:.0f} |" for r in rows]
    lines += ["", "Largest input peak / median |activation| (calibration prompts, fp32): " + ", ".join(
        f"{o['linear']} {o['peak']:.0f} ({o['peak_over_median']:.0f}x)" for o in res["outliers"][:8])]
    return lines


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--keep", default="0,2,8", show_default=True, help="numbers of outlier linears kept float")
@click.option("--out", required=True)
def main(bundle: str, keep: str, out: str) -> None:
    ov = ov_module()
    core = ov.Core()
    manifest = read_manifest(bundle)
    src = f"{bundle}/{manifest.graphs['llm'].files['fp32'].file}"
    ref = GateReference(bundle, manifest, None)
    cal = calibration_feeds(*ref.prompts(), ref.n)
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
        int8, u4 = f"{graphs}/llm.int8.xml", f"{graphs}/llm.u4.xml"
        compress_int8(src, int8)
        judged: list[tuple[str, str, int, str, dict]] = [(int8, "f32", 0, "int8 weights, f32 compute", {}),
                  (int8, "bf16", 0, "int8 weights, bf16 compute", {}),
                  (int8, "bf16", 32, "int8 weights, dynamic int8 activations (group 32)", {})]
        lossless = core.read_model(src)
        rebuilt = lossless_u4(lossless)
        if rebuilt:  # an LLM whose linears are not on a 4-bit group grid (random weights) has no lossless rows
            ov.save_model(lossless, u4, compress_to_fp16=False)
            judged += [(u4, "f32", 0, "its own 4-bit weights (lossless), f32 compute", {"linears": rebuilt}),
                       (u4, "bf16", 32, "its own 4-bit weights (lossless), dynamic int8 activations (group 32)",
                        {"linears": rebuilt})]
        for path, compute, group, what, extra in judged:
            rows.append({"variant": what, **extra, **_judge(ref, core, path, compute, group)})
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
    lines = _markdown(res)
    write_results(out, res, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
