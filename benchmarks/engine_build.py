"""TensorRT engine build cost for a bundle: time, plan size and layer precisions per engine.

Builds with the same code as ``timecma-engines build`` (into the bundle) and writes
``engine_build.json`` and ``engine_build.md`` with the machine record. On a CPU-only
machine only TensorRT-RTX builds; the engines are compiled, not executed.

    python -m benchmarks.engine_build --bundle runs/gpt2/bundle --precision fp16,fp32 --out benchmarks/results/x
"""

from __future__ import annotations

import json
import os

import click

from timecma.runtime.compile.tensorrt import PARITY_KEY, build_engines, parity_summary

from .machine import machine_info


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True))
@click.option("--precision", default="fp16,fp32", show_default=True)
@click.option("--trt-flavour", default="auto", show_default=True)
@click.option("--out", required=True, type=click.Path())
def main(bundle: str, precision: str, trt_flavour: str, out: str) -> None:
    built = build_engines(bundle, tuple(precision.split(",")), trt_flavour)
    from timecma.core.manifest import read_manifest

    from timecma.runtime.engines.cuda import current_capability

    m = read_manifest(bundle, verify=False)
    gpu_cc = current_capability()
    rows = [{"graph": e.graph, "precision": e.precision, "flavour": f"{e.flavour} {e.version}",
             "target": e.target, "build_s": e.info["build_seconds"], "plan_mb": round(e.bytes / 1e6, 1),
             "onnx_mb": round(m.files[e.onnx_file].bytes / 1e6, 1), "layers": e.network["layers"],
             "matmul_dtypes": e.network["layer_output_dtypes"]["matmul"],
             "profile": e.profile, "parity": e.info[PARITY_KEY], "added": e not in built.refused}
            for e in [*built, *built.refused]]
    info = machine_info()
    cfg = m.model_config.to_dict()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "engine_build.json"), "w") as f:
        json.dump({"machine": info, "bundle": os.path.abspath(bundle), "llm": m.llm.id if m.llm else None, "model_config": cfg,
                   "engines": rows}, f, indent=2)
    lines = [f"# TensorRT engine builds ({info['date']})", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, ISA {', '.join(info['isa'])}, "
             f"{f'GPU sm{gpu_cc}' if gpu_cc else 'no GPU'}; "
             f"Python {info['python']}. Bundle: LLM d_llm {cfg['d_llm']}, N = {cfg['num_nodes']}, "
             f"seq_len {cfg['seq_len']}, pred_len {cfg['pred_len']}.", "",
             "| graph | precision | flavour | target | build s | plan MB | ONNX MB | layers | matmul outputs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['graph']} | {r['precision']} | {r['flavour']} | {r['target']} | {r['build_s']} | "
                     f"{r['plan_mb']} | {r['onnx_mb']} | {r['layers']} | {r['matmul_dtypes']} |")
    lines += ["", "Gate (vs ONNX Runtime fp32 on the bundle's validation windows):"]
    lines += [f"- {r['graph']} {r['precision']}: {parity_summary(r['parity'])}"
              + ("" if r["added"] else " - not added to the bundle") for r in rows]
    with open(os.path.join(out, "engine_build.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
