"""Where a store hit's time goes: the bundle's forecaster graphs on OpenVINO, per graph, precision and
thread count, and one per-op profile (OpenVINO's own counters), batch 1.

    python -m benchmarks.forecaster_profile --bundle runs/gpt2-size-ckpt/bundle \\
        --out benchmarks/results/forecaster-profile-gpt2-size

A store hit is render + store read + this graph, so this says what bounds it: weight streaming
(FullyConnected kernels over the prompt encoder's d_llm-wide matrices) or per-node overhead.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import click
import numpy as np

from timecma.core.manifest import read_manifest

from .machine import machine_info, machine_line, write_results


def _median_ms(req, feeds: dict, iters: int) -> float:
    for _ in range(min(50, iters)):
        req.infer(feeds)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        req.infer(feeds)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--iters", default=400, show_default=True)
@click.option("--out", required=True)
def main(bundle: str, iters: int, out: str) -> None:
    import openvino as ov

    m = read_manifest(bundle)
    cfg, fc = m.model_config, m.graphs["forecaster"]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, cfg.seq_len, cfg.num_nodes), dtype=np.float32)}
    if cfg.uses_llm:
        feeds["prompt_emb"] = rng.standard_normal((1, cfg.num_nodes, cfg.d_llm), dtype=np.float32)
    graphs = {"dynamic batch": fc.files["fp32"].file}
    if fc.cpu_batch1:
        graphs["batch 1"] = fc.cpu_batch1.file
    graphs.update({f"IR {v.precision}": v.file for v in m.openvino if v.graph == "forecaster" and v.file})
    core = ov.Core()
    rows: list[dict[str, Any]] = []
    for label, file in graphs.items():
        for prec in ("f32", "bf16"):
            for threads in (0, 1):
                cfg_ov: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": prec}
                if threads:
                    cfg_ov["INFERENCE_NUM_THREADS"] = threads
                req = core.compile_model(os.path.join(bundle, file), "CPU", cfg_ov).create_infer_request()
                rows.append({"graph": label, "file": file, "compute": prec, "threads": threads or "all",
                             "p50_ms": _median_ms(req, feeds, iters)})
                click.echo(f"{label:14s} {prec:5s} threads {threads or 'all'}: {rows[-1]['p50_ms']:.3f} ms", err=True)
    best = min(rows, key=lambda r: r["p50_ms"])
    cfg_ov = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": best["compute"], "PERF_COUNT": True}
    if best["threads"] != "all":
        cfg_ov["INFERENCE_NUM_THREADS"] = best["threads"]
    req = core.compile_model(os.path.join(bundle, best["file"]), "CPU", cfg_ov).create_infer_request()
    _median_ms(req, feeds, 50)
    by_op: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for p in req.get_profiling_info():
        key = f"{p.node_type} ({p.exec_type})"
        by_op[key] += p.real_time.total_seconds() * 1e6
        count[key] += 1
    total = sum(by_op.values())
    weights_file = best["file"][:-4] + ".bin" if best["file"].endswith(".xml") else best["file"]
    weights = os.path.getsize(os.path.join(bundle, weights_file))
    res = {"bundle": os.path.basename(os.path.normpath(bundle)), "d_llm": cfg.d_llm, "num_nodes": cfg.num_nodes,
           "machine": machine_info(), "openvino": ov.__version__, "rows": rows, "fastest": best,
           "profile_us": {k: round(v, 1) for k, v in by_op.most_common()}, "profile_nodes": dict(count),
           "profile_total_us": round(total, 1), "fastest_graph_bytes": weights}
    lines = [f"# Forecaster at batch 1 on OpenVINO: {res['bundle']} (d_llm {cfg.d_llm}, N = {cfg.num_nodes})", "",
             f"{machine_line(res['machine'])} OpenVINO {ov.__version__}. Random inputs of the bundle's shapes; "
             f"p50 over {iters} calls.", "",
             "| graph | computes in | threads | p50 ms |", "|---|---|---|---|"]
    lines += [f"| {r['graph']} | {r['compute']} | {r['threads']} | {r['p50_ms']:.3f} |" for r in rows]
    lines += ["", f"Profile of the fastest ({best['graph']}, {best['compute']}, {best['threads']} thread(s); file "
              f"{best['file']}, {weights / 2**20:.1f} MB): {total:.0f} us in {sum(count.values())} nodes", "",
              "| op (kernel) | us | share | nodes |", "|---|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {v / total:.0%} | {count[k]} |" for k, v in by_op.most_common(10)]
    write_results(out, res, lines)
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
