"""What bounds a store miss: the LLM stage's arithmetic rate against the fastest dense GEMMs this CPU runs.

    python -m benchmarks.compute_bound --bundle runs/smollm2-ckpt/bundle --data timecma/datasets/ETTh1.csv \\
        --out benchmarks/results/compute-bound-smollm2-avx512

A store miss is N prompts through the LLM; every other stage is milliseconds. Its FLOPs are known from the
LLM's config (the decoder's linear layers, 2 x weights per token, plus attention's two T x T products),
so timing each backend's LLM stage (N real prompts x T tokens, as `timecma-bench` sweeps it) gives its
achieved rate. Beside it, the ceiling of its runtime and precision: a stack of the LLM's own MLP matrices
(d -> ff -> d, with the stage's N x T rows) on eager PyTorch, ONNX Runtime and OpenVINO in f32, bf16 and
int8 (ONNX Runtime's dynamic u8 x s8 MatMulInteger; OpenVINO's static w8a8 from NNCF, the recipe of the
`openvino:w8a8` variant). Stages and ceilings are timed in alternating rounds of one run, so the VM's
drift moves both. A backend near its precision's ceiling cannot be made much faster by a better graph;
only a cheaper precision (or fewer FLOPs) can, and the ceiling says by how much at most.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Callable

import click
import numpy as np

from timecma.core.timing import time_calls

from .machine import machine_info, machine_line, write_results

DEPTH = 4  # (d -> ff -> d) pairs in the dense stack: enough work per call that dispatch does not count
INT8 = ("int8", "w8a8")  # LLM graphs whose linears run int8 arithmetic (dynamic or static activations)


def llm_shapes(llm_dir: str) -> dict:
    """The decoder's widths from its Hugging Face config (GPT-2 names mapped by transformers)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(llm_dir)
    d, heads = c.hidden_size, c.num_attention_heads
    ff = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d
    kv = getattr(c, "num_key_value_heads", None) or heads
    gated = c.model_type != "gpt2"  # Llama, Mistral, Qwen2: gate, up and down projections
    return {"model_type": c.model_type, "layers": c.num_hidden_layers, "d": d, "ff": ff, "heads": heads, "kv_heads": kv,
            "linear_weights": c.num_hidden_layers * (2 * d * d + 2 * d * kv * (d // heads) + (3 if gated else 2) * d * ff)}


def stage_flops(s: dict, n: int, tokens: int) -> dict:
    """FLOPs of N prompts of T tokens: linears (2 per weight per token) and attention (QK^T and AV, T x T
    each, as the dense masked kernels compute them)."""
    linear = 2.0 * s["linear_weights"] * n * tokens
    attention = 2.0 * 2 * s["layers"] * n * tokens * tokens * s["d"]
    return {"linear": linear, "attention": attention, "total": linear + attention}


def _mlp_stack(d: int, ff: int, depth: int):
    import torch

    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(d, ff, bias=False), torch.nn.Linear(ff, d, bias=False)]
    for lin in layers:  # LLM-like scale so activations stay O(1) through the stack
        torch.nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
    return torch.nn.Sequential(*layers).eval()


def dense_flops(d: int, ff: int, rows: int) -> float:
    """FLOPs of one call of the dense stack."""
    return 2.0 * rows * d * ff * 2 * DEPTH


def dense_runners(d: int, ff: int, rows: int, tmp: str) -> dict[tuple[str, str], Callable[[], object]]:
    """(runtime, precision) -> a call running [rows, d] through DEPTH (d -> ff -> d) pairs of the LLM's MLP
    widths as that runtime's LLM graph runs a linear layer. bf16 only where the CPU computes it (elsewhere
    torch emulates it and OpenVINO runs f32: no one serves that)."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from timecma.core.machine import has_native_bf16
    from timecma.runtime.backends.openvino import ov_module
    from timecma.runtime.compile.openvino import nncf_w8a8

    model, x = _mlp_stack(d, ff, DEPTH), torch.randn(rows, d)
    run: dict[tuple[str, str], Callable[[], object]] = {}

    def torch_call(m, t):
        def call():
            with torch.inference_mode():
                m(t)
        return call

    run["torch", "f32"] = torch_call(model, x)
    src, q = os.path.join(tmp, "mlp.onnx"), os.path.join(tmp, "mlp.int8.onnx")
    torch.onnx.export(model, (x,), src, input_names=["x"], output_names=["y"], dynamo=False)
    feeds = {"x": x.numpy()}
    quantize_dynamic(src, q, weight_type=QuantType.QInt8)
    for prec, f in (("f32", src), ("int8", q)):
        sess = ort.InferenceSession(f, providers=["CPUExecutionProvider"])
        run["onnxruntime", prec] = functools.partial(sess.run, None, feeds)
    core, bf16 = ov_module().Core(), has_native_bf16()
    if bf16:
        run["torch", "bf16"] = torch_call(_mlp_stack(d, ff, DEPTH).to(torch.bfloat16), x.to(torch.bfloat16))
    calib = [{"x": np.random.default_rng(i).standard_normal((rows, d), dtype=np.float32)} for i in range(2)]
    graphs = {"f32": (src, "f32"), "int8": (nncf_w8a8(core.read_model(src), calib, []), None)}
    if bf16:
        graphs["bf16"] = (src, "bf16")
    for prec, (g, hint) in graphs.items():
        cfg = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_PRECISION_HINT": hint} if hint else {})}
        req = core.compile_model(g, "CPU", cfg).create_infer_request()
        run["openvino", prec] = functools.partial(req.infer, feeds)
    return run


def measure(cfg, specs: list[str], n: int, tokens: int, rounds: int) -> tuple[dict, list[dict], dict]:
    """Each backend's LLM stage on N real prompts x T tokens and each dense ceiling, alternating over
    ``rounds`` (median ms of each); returns (LLM shapes, stage rows, ceiling rows)."""
    from timecma.core.manifest import read_manifest
    from timecma.runtime import Forecaster
    from timecma.runtime.backends.eager import llm_source

    from .harness import open_backend, real_windows, sweep_inputs

    manifest = read_manifest(cfg.bundle)
    if manifest.llm is None:
        raise click.UsageError(f"{cfg.bundle}: the bundle's model has no LLM stage to bound")
    s = llm_shapes(llm_source(cfg.bundle, manifest, cfg.ckpt))
    values, ts = real_windows(manifest, 8, cfg.data)
    backends, skipped, ids = {}, {}, None
    for spec in specs:
        try:
            backends[spec] = open_backend(spec, cfg, manifest)
        except Exception as exc:  # reported beside the table, as timecma-bench does
            skipped[spec] = str(exc)
            continue
        if ids is None:
            ids, mask = sweep_inputs(Forecaster(cfg.bundle, manifest, backends[spec], None), values, ts, n, tokens)
    if not backends:
        raise click.UsageError(f"none of {specs} can run here: {skipped}")
    flops = stage_flops(s, n, tokens)
    stage_ms: dict[str, list[float]] = {b: [] for b in backends}
    with tempfile.TemporaryDirectory() as tmp:
        dense = dense_runners(s["d"], s["ff"], n * tokens, tmp)
        dense_ms: dict[tuple[str, str], list[float]] = {k: [] for k in dense}
        for fn in [*dense.values(), *(lambda b=b: b.run_llm(ids, mask) for b in backends.values())]:
            fn(), fn()  # warm-up: kernel selection, torch.compile's first graphs
        judged_by = {spec: _runtime_precision(b) for spec, b in backends.items()}
        alone = [k for k in dense if k not in judged_by.values()]
        for _ in range(rounds):  # each stage next to its own ceiling, so the VM's drift moves both
            for spec, b in backends.items():
                stage_ms[spec] += time_calls(lambda k: b.run_llm(ids, mask), 1)[0]
                if judged_by[spec] in dense:
                    dense_ms[judged_by[spec]] += time_calls(lambda k: dense[judged_by[spec]](), 3)[0]
            for key in alone:
                dense_ms[key] += time_calls(lambda k: dense[key](), 3)[0]
    per_call = dense_flops(s["d"], s["ff"], n * tokens)
    ceilings = [{"runtime": r, "precision": p, "ms": float(np.median(v)), "tflops": per_call / np.median(v) / 1e9}
                for (r, p), v in dense_ms.items()]
    stage = []
    for spec, b in backends.items():
        ms = float(np.median(stage_ms[spec]))
        runtime, prec = judged_by[spec]
        stage.append({"backend": spec, "runtime": runtime, "precision": prec, "n": n, "tokens": tokens, "ms": ms,
                      "gflop": flops["total"] / 1e9, "attention_share": flops["attention"] / flops["total"],
                      "tflops": flops["total"] / ms / 1e9})
    return s, stage, {"ceilings": ceilings, "skipped": skipped}


def _runtime_precision(backend) -> tuple[str, str]:
    """What a backend's linear layers compute in: the runtime and precision of the dense row to judge it by."""
    if backend.name.startswith("torch"):
        return "torch", "bf16" if backend.name.endswith("bf16") else "f32"
    if backend.name == "openvino":
        p = backend.precision.get("llm", "f32")
        return "openvino", "int8" if p in INT8 else p
    return "onnxruntime", "int8" if getattr(backend, "llm_variant", None) in INT8 else "f32"


def bounds(stage: list[dict], ceilings: list[dict], s: dict) -> dict:
    """The fastest LLM stage each precision allows (its best dense rate over the stage's FLOPs), as a
    speed-up over eager bf16 and torch.compile bf16 as timed in this run."""
    if not stage:
        return {}
    ms = {r["backend"]: r["ms"] for r in stage}
    f = stage_flops(s, stage[0]["n"], stage[0]["tokens"])["total"]
    best: dict[str, dict] = {}
    for c in ceilings:
        if c["tflops"] > best.get(c["precision"], {"tflops": 0})["tflops"]:
            best[c["precision"]] = c
    res = {}
    for prec, c in best.items():
        floor = f / c["tflops"] / 1e9
        res[prec] = {"best_runtime": c["runtime"], "tflops": c["tflops"], "floor_ms": floor,
                     **{f"ceiling_vs_{b}": ms[b] / floor for b in ("torch-bf16", "torch-compile-bf16") if b in ms}}
    return res


@click.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", help="The data file the bundle was made from (real windows for the prompts).")
@click.option("--backends", default="torch,torch-bf16,torch-compile,torch-compile-bf16,ort-cpu,openvino:f32,"
              "openvino:bf16,openvino:w8a8", show_default=True, help="timecma-bench backends whose LLM stage to time.")
@click.option("--n-vars", default=7, show_default=True, help="Prompts per LLM call (a window's N).")
@click.option("--prompt-tokens", default=256, show_default=True)
@click.option("--rounds", default=3, show_default=True, help="Alternating rounds (stage, then its ceiling).")
@click.option("--ckpt", help="The checkpoint for the torch rows (default: next to the bundle).")
@click.option("--out", required=True)
def main(bundle: str, data: str | None, backends: str, n_vars: int, prompt_tokens: int, rounds: int,
         ckpt: str | None, out: str) -> None:
    from .harness import BenchConfig

    specs = [b.strip() for b in backends.split(",") if b.strip()]
    cfg = BenchConfig(bundle=bundle, backends=specs, data=data, ckpt=ckpt)
    s, stage, dense = measure(cfg, specs, n_vars, prompt_tokens, rounds)
    ceil = dense["ceilings"]
    res = {"machine": machine_info(), "bundle": bundle, "llm": s, "rows": n_vars * prompt_tokens, "rounds": rounds,
           "dense_ceilings": ceil, "llm_stage": stage, "skipped": dense["skipped"], "bounds": bounds(stage, ceil, s)}
    top = {(c["runtime"], c["precision"]): c["tflops"] for c in ceil}
    st = stage[0]
    lines = [f"# What bounds the LLM stage: {s['model_type']}, {s['layers']} layers, d {s['d']}, ff {s['ff']} "
             f"({s['linear_weights'] / 1e6:.1f}M linear weights)", "", machine_line(res["machine"]), "",
             f"LLM stage alone: {st['n']} real prompts x {st['tokens']} tokens, {st['gflop']:.0f} GFLOP (attention "
             f"{100 * st['attention_share']:.0f}%). Dense ceilings: the LLM's MLP matrices, [{st['n'] * st['tokens']}, "
             f"{s['d']}] through {DEPTH} x ({s['d']} -> {s['ff']} -> {s['d']}). Medians over {rounds} alternating rounds.", "",
             "| runtime | precision | dense ceiling TFLOP/s |", "|---|---|---|"]
    lines += [f"| {c['runtime']} | {c['precision']} | {c['tflops']:.3f} |" for c in ceil]
    lines += ["", "| backend | computes in | LLM stage ms | TFLOP/s | share of its runtime's ceiling |",
              "|---|---|---|---|---|"]
    for r in stage:
        c = top.get((r["runtime"], r["precision"]))
        lines.append(f"| {r['backend']} | {r['runtime']} {r['precision']} | {r['ms']:.0f} | {r['tflops']:.3f} | "
                     + (f"{100 * r['tflops'] / c:.0f}% |" if c else "- |"))
    lines += [f"- {b} not run: {why}" for b, why in dense["skipped"].items()]
    lines += ["", "The fastest LLM stage each precision allows here (the stage's FLOPs at its best dense rate):", "",
              "| precision | best dense rate | floor ms | at most x eager bf16 | at most x torch.compile bf16 |",
              "|---|---|---|---|---|"]
    for prec, b in res["bounds"].items():
        lines.append(f"| {prec} | {b['tflops']:.3f} ({b['best_runtime']}) | {b['floor_ms']:.0f} | "
                     f"{b.get('ceiling_vs_torch-bf16', float('nan')):.2f}x | "
                     f"{b.get('ceiling_vs_torch-compile-bf16', float('nan')):.2f}x |")
    write_results(out, res, lines)
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
