"""Batch-1 latency harness (docs/design.md §11): every backend on the same inputs, per stage and end to
end, store hit and miss, sweeps over the number of variables and the prompt length, and a
parity column next to every timing (a fast wrong answer is not a result).

Timings are host wall-clock (``time.perf_counter``) around calls that return host arrays, so
on a GPU backend they include the device work and the copies (the calls synchronise).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from timecma.core.errors import BackendUnavailable
from timecma.core.machine import cpu_info, has_native_bf16
from timecma.core.manifest import Manifest, read_manifest
from timecma.core.timing import summarize, time_calls
from timecma.runtime import Forecaster, make_backend

from .machine import machine_info
from timecma.core.store import EmbeddingStore
from timecma.core.tokens import encode_prompts, pad_right

log = logging.getLogger(__name__)

STAGES = ("render", "tokenize", "store", "llm", "forecaster")
KINDS = ("miss", "prompt-hit", "hit")  # what a request finds in the store (``bench_end_to_end``)


@dataclass
class BenchConfig:
    bundle: str
    backends: list[str]
    n_vars: list[int] = field(default_factory=lambda: [7, 21])
    prompt_tokens: list[int] = field(default_factory=lambda: [64, 256])
    hit_iters: int = 200
    miss_iters: int = 10
    sweep_iters: int = 5
    warmup: int = 2
    budget_s: float = 30.0  # at most this long per measured point (after the first iterations)
    threads: int | None = None
    data: str | None = None  # real windows from here; default: the bundle's training data
    ckpt: str | None = None  # the checkpoint for the torch rows; default: its file name next to the bundle
    precompute_prompts: int = 0  # >0: embedding precompute throughput over this many real prompts
    precompute_batch: int = 32
    emulated_bf16: bool = False  # run the torch bf16 rows on a CPU without native bf16 too (slow: see open_backend)


def parse_backend(spec: str) -> tuple[str, dict]:
    """``torch``, ``torch-bf16``, ``torch-compile``, ``torch-compile-bf16`` (the anchors a CPU user tries first),
    ``ort-cpu``, ``ort-cpu:int8`` (LLM graph variant), ``ort-cuda``, ``tensorrt``, ``tensorrt:fp32`` (engine
    precision), ``openvino`` (auto: the gated fastest per graph), ``openvino:f32|bf16|int8|w8a8`` (both graphs in
    that precision; w8a8 is the LLM's, the forecaster then runs auto)."""
    if spec.startswith("torch-"):
        rest = spec[len("torch-"):]
        compiled = rest.startswith("compile")
        dtype = rest.removeprefix("compile").strip("-") or "float32"
        if dtype not in ("float32", "bf16") or (not compiled and dtype == "float32"):
            raise ValueError(f"unknown torch backend {spec!r}: torch, torch-bf16, torch-compile or torch-compile-bf16")
        return "torch", {"dtype": "bfloat16" if dtype == "bf16" else "float32", **({"compile": True} if compiled else {})}
    name, _, variant = spec.partition(":")
    if not variant:
        return name, {}
    return name, ({"precision": variant} if name in ("tensorrt", "openvino") else {"llm_variant": variant})


def open_backend(spec: str, cfg: BenchConfig, manifest: Manifest):
    name, kwargs = parse_backend(spec)
    if name == "torch" and kwargs.get("dtype") == "bfloat16" and not cfg.emulated_bf16 and not has_native_bf16():
        # 2-core AVX2 EPYC: one GPT-2-size pass (7 x 256 tokens) 376 s in bf16, 3.7 s in fp32: an hour per bench row
        raise BackendUnavailable(
            f"this CPU ({', '.join(cpu_info()['isa']) or 'unknown ISA'}) has no native bf16 (AVX-512 BF16 or AMX): "
            "PyTorch emulates it, 6x (SmolLM2) to 100x (GPT-2) slower than fp32, no anchor a user here would pick; "
            "--emulated-bf16 measures it anyway")
    if (name.startswith("ort") or name == "openvino") and cfg.threads:
        kwargs["threads"] = cfg.threads
    if name == "torch" and cfg.ckpt:
        kwargs["ckpt"] = cfg.ckpt
    return make_backend(name, cfg.bundle, manifest, **kwargs)


def real_windows(manifest: Manifest, n: int, data: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n consecutive windows (one row apart, so every window's prompts differ) from the end of the data."""
    from timecma.data import load_series  # pandas: the benchmark machine has the training extras

    src = manifest.data.source
    if not data or not os.path.exists(data):
        raise FileNotFoundError(f"real windows need the data file the bundle was made from ({src.get('file')}, "
                                f"{src.get('rows')} rows); pass --data" + (f" ({data!r} not found)" if data else ""))
    path = data
    s = load_series(path, manifest.data.time_col)
    if s.variables != manifest.data.variables:
        raise ValueError(f"{path} has variables {s.variables}, the bundle expects {manifest.data.variables}")
    L = manifest.model_config.seq_len
    starts = np.arange(len(s.values) - L - n + 1, len(s.values) - L + 1)
    return (np.stack([s.values[i:i + L] for i in starts]), np.stack([s.timestamps[i:i + L] for i in starts]))


def bench_bundle(manifest: Manifest, backend, values: np.ndarray, ts: np.ndarray,
                 cfg: BenchConfig) -> tuple[dict, Forecaster]:
    """End-to-end timings of ``cfg.bundle`` on ``backend`` with a fresh store (none for a model
    without the LLM branch), so the first request of each window is a miss; and the Forecaster."""
    with tempfile.TemporaryDirectory() as tmp:
        store = (EmbeddingStore(os.path.join(tmp, "store"), manifest.llm.namespace, manifest.llm.d_llm)
                 if manifest.llm else None)
        f = Forecaster(cfg.bundle, manifest, backend, store)
        try:
            return bench_end_to_end(f, values, ts, cfg), f
        finally:
            if store is not None:
                store.close()


def bench_end_to_end(f: Forecaster, values: np.ndarray, ts: np.ndarray, cfg: BenchConfig) -> dict:
    """Store miss (each request a new window), prompt hit (a new window whose prompts the store holds: filled by
    a batched request, as a backtest or precompute would) and hit (one window again and again: where the
    backend runs the forecaster split, its stored encoded prompts skip rendering and the prompt encoder too)."""
    res: dict[str, Any] = {}
    n = max(1, min(cfg.miss_iters, (len(values) - 1) // 2))
    for kind in KINDS:
        stage_ms: dict[str, list[float]] = {s: [] for s in STAGES}
        outs = []
        if kind == "miss":
            idx = list(range(1, 1 + n))
            f.predict(values[0], ts[0])  # warm-up on a window not measured
        elif kind == "prompt-hit":
            idx = list(range(1 + n, 1 + 2 * n))
            f.predict_many(values[idx], ts[idx])  # embeddings stored, no window record (the batched path)
        else:
            idx = [0] * cfg.hit_iters
            for _ in range(cfg.warmup + 3):
                f.predict(values[0], ts[0])
        def call(k: int):
            before = dict(f.stats.seconds)
            return before, f.predict(values[idx[k]], ts[idx[k]]), dict(f.stats.seconds)

        total, results = time_calls(call, len(idx), budget_s=cfg.budget_s)
        for before, y, after in results:
            for s in STAGES:
                stage_ms[s].append((after[s] - before[s]) * 1000)
            if kind == "miss":
                outs.append(y)
        res[kind] = {"end_to_end_ms": summarize(total), "stages_ms": {s: summarize(v) for s, v in stage_ms.items()},
                     "windows": idx[:len(total)]}
        if kind == "miss":
            res["forecasts"] = np.stack(outs)
    return res


def sweep_inputs(f: Forecaster, values: np.ndarray, ts: np.ndarray, n: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """n real prompts (from successive windows) cut or tiled to ``tokens`` tokens each."""
    assert f.renderer is not None and f.tokenizer is not None, "LLM prompts of a bundle with the LLM branch"
    prompts: list[str] = []
    w = 0
    while len(prompts) < n:
        prompts += f.renderer.render_series(values[w % len(values)], ts[w % len(ts)], [0], f.seq_len)
        w += 1
    ids = [np.resize(i, tokens) for i in encode_prompts(f.tokenizer, prompts[:n])]
    return pad_right(ids, f.pad_id)


def bench_precompute(bundle: str, manifest: Manifest, data: str | None, n_prompts: int, batch_size: int,
                     progress=None, ckpt: str | None = None) -> dict:
    """Embedding precompute throughput on the bundle's LLM and real prompts, every way training can embed
    (``benchmarks.precompute_speed``): the reference's one-at-a-time loop, eager fp32/bf16 batched, and the
    exported graph on the runtime's engines, each with its embedding error against eager fp32."""
    from timecma.llm import load_llm, recorded_layers
    from timecma.core.prompts import PromptRenderer
    from timecma.runtime.backends.eager import llm_source

    from .precompute_speed import precompute_modes

    assert manifest.prompt is not None and manifest.llm is not None, "the prompts of a bundle with the LLM branch"
    n_vars = manifest.model_config.num_nodes
    values, ts = real_windows(manifest, n_prompts // n_vars + 1, data)
    renderer = PromptRenderer.from_record(manifest.prompt, manifest.data.frequency)
    prompts = [p for v, t in zip(values, ts) for p in renderer.render_series(v, t, [0], len(v))][:n_prompts]
    fast = load_llm(llm_source(bundle, manifest, ckpt), layers=recorded_layers(manifest.llm.info))
    return precompute_modes(fast, encode_prompts(fast.backend, prompts), batch_size, progress=progress)


def run(cfg: BenchConfig, progress=None) -> dict:
    """Measure every backend in ``cfg.backends``; the first one that is eager torch fp32 is the reference."""
    manifest = read_manifest(cfg.bundle)
    ref = "torch" if "torch" in cfg.backends else cfg.backends[0]
    order = [ref] + [b for b in cfg.backends if b != ref]
    values, ts = real_windows(manifest, max(2 * cfg.miss_iters + 1, 8), cfg.data)
    scale = values.reshape(-1, values.shape[-1]).std(axis=0)  # parity in units of the series' spread
    results: dict = {"config": asdict(cfg), "machine": machine_info(), "reference": ref,
                     "bundle": {"model": manifest.model_config.model, "llm": manifest.llm.id if manifest.llm else None,
                                "d_llm": manifest.model_config.d_llm,
                                "n_vars": manifest.model_config.num_nodes,
                                "seq_len": manifest.model_config.seq_len,
                                "pred_len": manifest.model_config.pred_len},
                     "backends": {}, "sweep": []}
    ref_fc: np.ndarray | None = None
    ref_emb: dict[tuple[int, int], np.ndarray] = {}
    for spec in order:
        try:
            backend = open_backend(spec, cfg, manifest)
        except Exception as exc:  # a backend that cannot run here is reported, not fatal
            log.warning("backend %s skipped: %s", spec, exc)
            results["backends"][spec] = {"skipped": str(exc)}
            continue
        e2e, f = bench_bundle(manifest, backend, values, ts, cfg)
        fc = e2e.pop("forecasts")
        if ref_fc is None:  # the first row that ran is the reference (the one asked for may have been skipped)
            ref_fc, results["reference"] = fc, spec
        k = min(len(fc), len(ref_fc))
        e2e["parity_vs_reference"] = {"max_abs_over_series_std": float((np.abs(fc[:k] - ref_fc[:k]) / scale).max()),
                                      "windows_compared": k}
        if hasattr(backend, "llm_variant"):
            e2e["llm_graph"] = backend.llm_variant
        if backend.name == "openvino":  # the precisions it runs and what their accuracy gate measured at export
            e2e["precision"] = backend.precision
            e2e["gate_mse_rel_change"] = {v.graph: v.mse_rel_change for v in manifest.openvino
                                          if backend.precision.get(v.graph) == v.precision}
        results["backends"][spec] = e2e
        if progress:
            progress(f"{spec}: end to end miss p50 {e2e['miss']['end_to_end_ms']['p50']:.2f} ms, "
                     f"hit p50 {e2e['hit']['end_to_end_ms']['p50']:.3f} ms")
        for n in cfg.n_vars if manifest.llm else ():  # the LLM stage alone
            for tok in cfg.prompt_tokens:
                ids, mask = sweep_inputs(f, values, ts, n, tok)
                ms, embs = time_calls(lambda k: backend.run_llm(ids, mask), cfg.sweep_iters, 1, cfg.budget_s)
                emb = embs[-1]
                ref_emb.setdefault((n, tok), emb)
                err = float(np.abs(emb - ref_emb[(n, tok)]).max())
                rel = err / float(np.abs(ref_emb[(n, tok)]).max())
                results["sweep"].append({"backend": spec, "n_vars": n, "prompt_tokens": tok, "llm_ms": summarize(ms),
                                         "parity_max_abs": err, "parity_rel_to_max": rel})
                if progress:
                    progress(f"{spec}: LLM N={n} x {tok} tokens p50 {summarize(ms)['p50']:.1f} ms")
    if cfg.precompute_prompts and manifest.llm:
        results["precompute"] = bench_precompute(cfg.bundle, manifest, cfg.data, cfg.precompute_prompts, cfg.precompute_batch,
                                                 progress, cfg.ckpt)
    add_speedups(results)
    return results


def add_speedups(results: dict) -> None:
    """Speed-ups of every row against each anchor that ran (eager fp32, eager bf16, torch.compile bf16) and
    against the fastest PyTorch row of each kind, all from this run's p50s (recomputable from results.json)."""
    for anchor in ANCHORS:
        base = results["backends"].get(anchor, {})
        if not base or "skipped" in base:
            continue
        for spec, r in results["backends"].items():
            if "skipped" not in r:
                r.setdefault("speedup_vs", {})[anchor] = {k: base[k]["end_to_end_ms"]["p50"] / r[k]["end_to_end_ms"]["p50"]
                                                          for k in KINDS}
    # and against the fastest PyTorch row of each kind: the number a user weighs (without native bf16, CPUs
    # run bf16 emulated, several times slower than fp32: beating those anchors says nothing there)
    torch_rows = {s: r for s, r in results["backends"].items() if s.startswith("torch") and "skipped" not in r}
    if torch_rows:
        results["fastest_torch"] = {k: min(torch_rows, key=lambda s: torch_rows[s][k]["end_to_end_ms"]["p50"])
                                    for k in KINDS}
        for r in results["backends"].values():
            if "skipped" not in r:
                r.setdefault("speedup_vs", {})[FASTEST_TORCH] = {
                    k: torch_rows[results["fastest_torch"][k]][k]["end_to_end_ms"]["p50"] / r[k]["end_to_end_ms"]["p50"]
                    for k in KINDS}


ANCHORS = ("torch", "torch-bf16", "torch-compile-bf16")
FASTEST_TORCH = "fastest-torch"  # the speed-up column against the fastest PyTorch row of the run
