"""Rows per second: single-process serve-batch against serve-batch on Ray with 1 and 2 workers, same input,
same machine, one run (docs/design.md §13). Each configuration runs twice: with an empty store (every prompt a miss,
the LLM stage included) and again with the store it filled (every prompt a hit).

    python -m benchmarks.ray_scaling --bundle runs/demo/etth1/bundle --out benchmarks/results/ray-scaling

The input is a fleet built from ETTh1's rows after the ett test split: ``--series`` series (each a copy with
its own small offset, so prompts differ and the store cannot share them) over ``--files`` files, rolling
windows every ``--stride`` rows. The Ray cluster is started before the clock starts; its start-up is
reported on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import click
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from timecma.core.manifest import read_manifest
from timecma.core.ray_setup import LOCAL, RayPool, connect

from .machine import machine_info


def make_fleet(data: str, out_dir: str, series: int, files: int, start_row: int, time_col: str,
               variables: list[str]) -> int:
    """``series`` offset copies of the rows from ``start_row`` on, interleaved over ``files`` files."""
    t = pcsv.read_csv(data).slice(start_row)
    os.makedirs(out_dir, exist_ok=True)
    per_file: list[list[pa.Table]] = [[] for _ in range(files)]
    for s in range(series):
        cols = {"id": pa.array([f"s{s:03d}"] * t.num_rows), time_col: t.column(time_col)}
        for v in variables:
            cols[v] = pa.array(t.column(v).to_numpy() + 0.01 * (s + 1))
        per_file[s % files].append(pa.table(cols))
    rows = 0
    for k, tables in enumerate(per_file):
        table = pa.concat_tables(tables)
        pq.write_table(table, os.path.join(out_dir, f"part-{k:02d}.parquet"))
        rows += table.num_rows
    return rows


def _local(bundle: str, inp: str, out: str, store: str, stride: int) -> dict:
    from timecma.runtime import Forecaster
    from timecma.runtime.serving.batch import BatchServer

    t0 = time.perf_counter()
    with Forecaster.load(bundle, backend="ort-cpu", store=store) as f:
        load_s = time.perf_counter() - t0
        s = BatchServer(f, "id", "rolling", stride).run(inp, out, progress=False)
        hits, misses = f.stats.hits, f.stats.misses
    return {"seconds": time.perf_counter() - t0, "load_s": load_s, "windows": s.windows, "rows_out": s.rows_written,
            "store_hits": hits, "store_misses": misses}


def _ray(bundle: str, inp: str, out: str, store: str, stride: int, workers: int) -> dict:
    from timecma.runtime.serving.ray_batch import serve_batch_on_ray
    from timecma.runtime.serving.batch import list_inputs

    t0 = time.perf_counter()
    s = serve_batch_on_ray(*list_inputs(inp), bundle, out, series_col="id", mode="rolling", stride=stride,
                           backend="ort-cpu", store=store, pool=RayPool(LOCAL, workers), force=True, progress=False)
    return {"seconds": time.perf_counter() - t0, "windows": s.windows, "rows_out": s.rows_written,
            "output_files": s.output_files}


@click.command()
@click.option("--bundle", required=True)
@click.option("--data", default="timecma/datasets/ETTh1.csv", show_default=True)
@click.option("--series", "series_list", default="16,64", show_default=True,
              help="Fleet sizes; two or more give the marginal cost per window (the slope), which is what more "
                   "workers and nodes divide, apart from the fixed per-job cost.")
@click.option("--files", default=4, show_default=True)
@click.option("--start-row", default=14400, show_default=True, help="First input row (ETTh1: after the test split).")
@click.option("--stride", default=24, show_default=True)
@click.option("--out", required=True)
def main(bundle: str, data: str, series_list: str, files: int, start_row: int, stride: int, out: str) -> None:
    m = read_manifest(bundle)
    work = tempfile.mkdtemp(prefix="timecma-ray-scaling-")
    res: dict = {"machine": machine_info(), "input": {"series": series_list, "files": files,
                                                      "variables": len(m.data.variables), "stride": stride,
                                                      "mode": "rolling", "data": os.path.basename(data),
                                                      "start_row": start_row},
                 "bundle": {"model": m.model_config.model, "d_llm": m.model_config.d_llm,
                            "seq_len": m.model_config.seq_len, "pred_len": m.model_config.pred_len}, "runs": []}
    t0 = time.perf_counter()
    connect(LOCAL, progress=False)
    import ray

    res["ray"] = {"version": ray.__version__, "cluster_start_s": time.perf_counter() - t0,
                  "cpus": ray.cluster_resources().get("CPU")}
    configs = [("single process", None), ("ray, 1 worker", 1), ("ray, 2 workers", 2)]
    for series in [int(x) for x in series_list.split(",")]:
        inp = os.path.join(work, f"in-{series}")
        rows = make_fleet(data, inp, series, files, start_row, m.data.time_col, m.data.variables)
        for name, workers in configs:
            store = os.path.join(work, f"store-{series}-{workers or 0}")
            for phase in ("miss", "hit"):  # empty store first, then the store that run filled
                dest = os.path.join(work, f"out-{workers or 0}" + ("" if workers else ".parquet"))
                r = (_local(bundle, inp, dest, store, stride) if workers is None
                     else _ray(bundle, inp, dest, store, stride, workers))
                r.update(config=name, workers=workers or 0, store=phase, series=series, rows=rows,
                         rows_per_s=rows / r["seconds"], windows_per_s=r["windows"] / r["seconds"])
                res["runs"].append(r)
                click.echo(f"{series:4d} series  {name:16s} store {phase}: {r['seconds']:6.1f} s  "
                           f"{r['rows_per_s']:8.0f} rows/s  {r['windows_per_s']:6.1f} windows/s")
    res["marginal"] = marginal(res["runs"])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(res))
    shutil.rmtree(work, ignore_errors=True)
    click.echo(f"wrote {out}/results.json and results.md")


def marginal(runs: list[dict]) -> list[dict]:
    """Per configuration and store phase: fixed seconds per job and windows/s of the added work (the slope
    between the smallest and the largest fleet)."""
    out = []
    for cfg in dict.fromkeys(r["config"] for r in runs):
        for phase in ("miss", "hit"):
            rs = sorted((r for r in runs if r["config"] == cfg and r["store"] == phase), key=lambda r: r["windows"])
            if len(rs) < 2 or rs[-1]["windows"] == rs[0]["windows"]:
                continue
            a, b = rs[0], rs[-1]
            per_window = (b["seconds"] - a["seconds"]) / (b["windows"] - a["windows"])
            out.append({"config": cfg, "store": phase, "fixed_s": a["seconds"] - per_window * a["windows"],
                        "marginal_windows_per_s": 1.0 / per_window if per_window > 0 else float("inf"),
                        "marginal_rows_per_s": (b["rows"] - a["rows"]) / max(b["seconds"] - a["seconds"], 1e-9)})
    return out


def markdown(res: dict) -> str:
    mi, inp = res["machine"], res["input"]
    lines = [f"# serve-batch scaling: single process vs Ray ({mi['date']})", "",
             f"{mi['cpu']}, {mi['cores']} cores, ISA {', '.join(mi['isa'])}; Ray {res['ray']['version']} "
             f"(local cluster, {res['ray']['cpus']:g} CPUs, start-up {res['ray']['cluster_start_s']:.1f} s, not "
             f"counted below); ONNX Runtime {mi['onnxruntime']} CPU.", "",
             f"Input: {inp['data']} rows {inp['start_row']}+ as {inp['series']} offset series x {inp['variables']} "
             f"variables in {inp['files']} parquet files, rolling windows every {inp['stride']} rows; bundle "
             f"{res['bundle']}.", "",
             "| series | rows | configuration | store | seconds | rows/s | windows/s | vs single process |",
             "|---|---|---|---|---|---|---|---|"]
    base = {(r["series"], r["store"]): r["seconds"] for r in res["runs"] if r["workers"] == 0}
    for r in res["runs"]:
        lines.append(f"| {r['series']} | {r['rows']} | {r['config']} | {r['store']} | {r['seconds']:.1f} | "
                     f"{r['rows_per_s']:.0f} | {r['windows_per_s']:.1f} | "
                     f"{base[(r['series'], r['store'])] / r['seconds']:.2f}x |")
    if res.get("marginal"):
        lines += ["", "Fixed cost per job and throughput of the added work (slope between the two fleet sizes):", "",
                  "| configuration | store | fixed s per job | marginal windows/s | marginal rows/s |",
                  "|---|---|---|---|---|"]
        for m in res["marginal"]:
            lines.append(f"| {m['config']} | {m['store']} | {m['fixed_s']:.1f} | {m['marginal_windows_per_s']:.0f} | "
                         f"{m['marginal_rows_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
