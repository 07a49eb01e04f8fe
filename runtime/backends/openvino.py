"""``openvino`` backend: the bundle's graphs on OpenVINO's CPU plugin, in a gated precision (torch-free).

Per graph the precision is f32 (the fp32 ONNX graph as it is), bf16 (the same graph compiled
with OpenVINO's bf16 inference-precision hint, where the CPU has native bf16), int8 (an IR in
the bundle with NNCF int8 weights) or, for the LLM, w8a8 (an IR with int8 weights and
activations: NNCF static quantisation with SmoothQuant, int8 compute on VNNI / AMX-INT8).
Lower precisions are used only as the accuracy gate recorded in the manifest allows
(``timecma-engines openvino``, run by export): ``auto`` takes, per graph, the fastest variant
that passed on this CPU kind; a forced one is used with a warning if it failed. Compiled models
are cached in the user cache dir, so a second load is fast.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from typing import Callable

import numpy as np

from timecma.core.errors import BackendUnavailable, BundleError
from timecma.core.files import user_cache_dir
from timecma.core.machine import has_native_bf16
from timecma.core.manifest import Manifest, OVVariant
from timecma.core.store import precision_tag

from .base import HEAD_THREADS, forecaster_feeds, split_id

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16", "int8", "w8a8")
# the forecaster at batch 1 streams its weights for 7 tokens (profiled: benchmarks/forecaster_profile.py): int8
# weights cut that; int8 activations would only add quantisers
LLM_ONLY = ("w8a8",)


def ov_module():
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailable("OpenVINO is not installed: pip install 'timecma[openvino]'") from exc
    return ov


def compute_precision(precision: str) -> str:
    """What the CPU computes the unquantised ops in: bf16 for the bf16 variant, and for the int8 ones where the
    CPU has native bf16 (int8 weights at GPT-2 size: 840 ms vs 1021 ms with f32 activations, same error; a w8a8
    SmolLM2 with its down-projections also float: worst held-out prompt 4.9e-2 vs 5.6e-2, 1391 vs 2027 ms);
    f32 otherwise."""
    return "bf16" if precision == "bf16" or (precision in ("int8", "w8a8") and has_native_bf16()) else "f32"


@functools.lru_cache(maxsize=1)
def _core():
    """One OpenVINO Core per process."""
    return ov_module().Core()


def graph_cache_dir(path: str, config: dict) -> str:
    """The compiled-model cache folder for this version of a graph file and this compile config.

    OpenVINO (2026.4) keys a model compiled from a file by the file's path and not by its content
    or by the inference precision: a graph re-exported to the same path loaded the old graph's
    blob, and a bf16 compile after an f32 one of the same file loaded the f32 blob (measured on
    SmolLM2: embeddings 35% off instead of 1%, and the bf16 variant refused for it). One folder per
    file version (real path, size, mtime; for IR also its .bin) and config makes each compile its own."""
    stamp = [repr(sorted(config.items()))]
    for p in (path, path[:-4] + ".bin") if path.endswith(".xml") else (path,):
        st = os.stat(p)
        stamp.append(f"{os.path.realpath(p)}:{st.st_size}:{st.st_mtime_ns}")
    return user_cache_dir("openvino", hashlib.sha256("|".join(stamp).encode()).hexdigest()[:24])


def compile_graph(path: str, precision: str, threads: int | None = None):
    """One graph (ONNX or IR) compiled for the CPU plugin: latency hint, precision hint, its own cache folder."""
    cfg: dict[str, str | int] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": compute_precision(precision)}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return _core().compile_model(path, "CPU", {**cfg, "CACHE_DIR": graph_cache_dir(path, cfg)})


def compiled_runner(compiled) -> Callable[[dict], np.ndarray]:
    """A compiled model as a function: feeds -> its first output as float32 (one infer request, reused)."""
    req = compiled.create_infer_request()

    def run(feeds: dict) -> np.ndarray:
        req.infer(feeds)
        return np.array(req.get_output_tensor(0).data, dtype=np.float32)

    return run


def graph_runner(path: str, precision: str, threads: int | None = None) -> Callable[[dict], np.ndarray]:
    """A graph file compiled the way serving compiles it (``compile_graph``), as a function."""
    return compiled_runner(compile_graph(path, precision, threads))


def choose(manifest: Manifest, graph: str, precision: str) -> tuple[str, OVVariant | None]:
    """The precision to run ``graph`` in, and its gate record (None: f32 without one)."""
    variants = {v.precision: v for v in manifest.openvino if v.graph == graph}
    if precision == "auto":
        f32 = variants.get("f32")
        why: dict[str, str] = {}
        for v in variants.values():
            if not v.accepted:
                why[v.precision] = f"refused by its gate: {v.verdict}"
            elif v.precision == "bf16" and not has_native_bf16():
                why[v.precision] = "no native bf16 on this CPU"
            elif v.precision != "f32" and f32 is not None and v.ms >= 0.95 * f32.ms:
                # a lower precision only for a real gain: 5% faster than f32 on the gate's timing, not noise
                why[v.precision] = f"not 5% faster than f32 ({v.ms:.2f} vs {f32.ms:.2f} ms)"
        ok = [v for v in variants.values() if v.precision not in why]
        best = min(ok, key=lambda v: v.ms, default=None)
        log.info("openvino %s: auto runs %s", graph,
                 f"{best.precision} ({best.ms:.2f} ms at its gate, the fastest accepted)" if best else "f32 (no gate)")
        for p, reason in why.items():
            log.info("openvino %s: not %s: %s", graph, p, reason)
        return (best.precision, best) if best else ("f32", None)
    if precision != "f32" and precision not in variants:
        raise BundleError(f"the bundle has no gated OpenVINO {precision} variant of the {graph} graph (it has "
                          f"{sorted(variants) or 'none'}); run: timecma-engines openvino BUNDLE")
    chosen = variants.get(precision)
    if chosen is not None and not chosen.accepted:
        log.warning("OpenVINO %s %s failed its accuracy gate (%s); used because it was asked for", graph, precision,
                    chosen.verdict)
    return precision, chosen


class OpenVinoBackend:
    """The runtime's backend interface on OpenVINO CPU; ``precision`` is auto or one of PRECISIONS (both graphs)
    or ``{"llm": ..., "forecaster": ...}``."""

    name = "openvino"
    limits: dict[str, int] = {}

    def __init__(self, bundle_dir: str, manifest: Manifest, precision: str | dict = "auto", threads: int | None = None):
        ov_module()
        per = precision if isinstance(precision, dict) else {
            "llm": precision, "forecaster": "auto" if precision in LLM_ONLY else precision}
        self.precision: dict[str, str] = {}
        self._run: dict[str, Callable[[dict], np.ndarray]] = {}
        for g in ("llm", "forecaster"):
            graph = manifest.graphs.get(g)
            if graph is None:  # models without the LLM branch
                continue
            prec, v = choose(manifest, g, per.get(g, "auto"))
            path = os.path.join(bundle_dir, v.file if v is not None and v.file else graph.files["fp32"].file)
            self._run[g] = graph_runner(path, prec, threads)
            self.precision[g] = prec
        self.llm_precision = precision_tag(self.name, self.precision.get("llm", "f32"))
        # batch-1 requests with a store: prompt encoder and head apart (``Backend.split``), where the forecaster
        # runs in f32 (the split graphs are f32 graphs; a forced lower precision keeps the whole graph); compiled
        # on first use (a Forecaster without a store never runs them)
        self.split = split_id(manifest) if self.precision.get("forecaster") == "f32" else None
        split = manifest.graphs["forecaster"].cpu_split
        self._split_graphs = {} if not self.split or split is None else {
            "prompt_encoder": (os.path.join(bundle_dir, split.prompt_encoder.file), threads),
            "head": (os.path.join(bundle_dir, split.head.file), HEAD_THREADS)}
        log.info("openvino: %s", ", ".join(f"{g} {p}" for g, p in self.precision.items()))

    def run_llm(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._run["llm"]({"input_ids": input_ids, "attention_mask": attention_mask})

    def run_forecaster(self, x: np.ndarray, prompt_emb: np.ndarray | None) -> np.ndarray:
        return self._run["forecaster"](forecaster_feeds(x, prompt_emb))

    def _split_run(self, name: str) -> Callable[[dict], np.ndarray]:
        if name not in self._run:
            self._run[name] = graph_runner(self._split_graphs[name][0], "f32", self._split_graphs[name][1])
        return self._run[name]

    def run_prompt_encoder(self, prompt_emb: np.ndarray) -> np.ndarray:
        return self._split_run("prompt_encoder")({"prompt_emb": prompt_emb})

    def run_head(self, x: np.ndarray, prompt_enc: np.ndarray) -> np.ndarray:
        return self._split_run("head")({"x": x, "prompt_enc": prompt_enc})

    def close(self) -> None:
        self._run.clear()
