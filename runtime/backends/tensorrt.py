"""TensorRT backend: the bundle's engines for this GPU and the installed flavour, through the one
engine runner (``engine_runner.EngineRunner``). Torch-free.

Serving limits (LLM prompts per call, tokens per prompt, windows per forecaster call) come
from the engines' profiles, so the pipeline never asks for a shape that was not built.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from timecma.core.errors import BackendUnavailable
from timecma.core.manifest import Engine, Manifest
from timecma.core.store import FP32, precision_tag

from ..engines import cuda as _cuda
from ..engines.cuda import CudaRuntime
from ..engines.trt_flavour import LABELS, RTX_EXPLICIT, RTX_PORTABLE, flavour_named, installed
from ..engines.trt_runner import EngineIO, EngineRunner
from .base import WholeForecaster, forecaster_feeds

log = logging.getLogger(__name__)


def build_command(bundle_dir: str, flavour: str, precision: str, gpu_cc: str | None = None) -> str:
    cmd = f"timecma-engines build {bundle_dir} --trt-flavour {'rtx' if flavour == 'tensorrt_rtx' else 'standard'}"
    cmd += f" --precision {precision}"
    if flavour == "tensorrt_rtx" and gpu_cc and gpu_cc in RTX_EXPLICIT and gpu_cc not in RTX_PORTABLE:
        cmd += f" --compute-capability {gpu_cc}"
    return cmd


PARITY_KEY = "parity_vs_ort_fp32"  # the gate's record in an engine's manifest entry (runtime.compile.tensorrt)
# engines by what the gate knows of them: passed on this GPU generation, passed on another one, never run
_GATE_RANK = {"accepted here": 0, "accepted elsewhere": 1, "not gated": 2}


def gate_state(entry: Engine, gpu_cc: str) -> str:
    """What the build's gate found for an engine: ``accepted here`` (on this compute capability),
    ``accepted elsewhere`` (on another GPU it targets), ``refused``, or ``not gated`` (built without a
    GPU it targets, or recorded by an older timecma)."""
    p = entry.info.get(PARITY_KEY) or {}
    if "accepted" not in p:
        return "not gated"
    if not p["accepted"]:
        return "refused"
    return "accepted here" if p.get("gpu") == f"sm{gpu_cc}" else "accepted elsewhere"


def select_engines(manifest: Manifest, bundle_dir: str, gpu_cc: str, flavours: dict[str, str],
                   precision: str = "fp16") -> dict[str, Engine]:
    """One engine per graph that runs here: an installed flavour of the same version, this GPU among
    its targets, built from the bundle's current ONNX graph, not refused by the gate. Engines that
    passed the gate on this GPU come first, then those that passed on another, then those never run
    on a GPU; within each, the wanted precision first, then standard TensorRT.

    Otherwise BackendUnavailable saying what the bundle has, what this machine needs and the
    command that builds it.
    """
    engines = manifest.engines
    usable_flavours = {k: v for k, v in flavours.items() if not v.startswith("not installed")}
    if not usable_flavours:
        raise BackendUnavailable("no TensorRT flavour is installed: " + "; ".join(flavours.values()))
    want_flavour = "tensorrt" if "tensorrt" in usable_flavours else "tensorrt_rtx"
    if gpu_cc == "90" and want_flavour == "tensorrt_rtx":
        hopper = (" TensorRT-RTX does not list Hopper (sm90, H100/H200) in its support matrix: install standard "
                  "TensorRT for this GPU, or use --backend ort-cuda.")
    else:
        hopper = ""
    fix = build_command(bundle_dir, want_flavour, precision, gpu_cc)
    if not engines:
        raise BackendUnavailable(f"the bundle has no TensorRT engines; build them on this machine with `{fix}`.{hopper}")
    chosen = {}
    for graph in manifest.graphs:  # "forecaster", and "llm" where the model has an LLM branch
        shas = {v.file: manifest.sha256(v.file) for v in manifest.graphs[graph].files.values()}
        cands = [e for e in engines if e.graph == graph and usable_flavours.get(e.flavour) == e.version
                 and gpu_cc in e.compute_capabilities and shas.get(e.onnx_file) == e.onnx_sha256
                 and gate_state(e, gpu_cc) != "refused"]
        cands.sort(key=lambda e: (_GATE_RANK[gate_state(e, gpu_cc)], e.precision != precision,
                                  e.flavour != "tensorrt"))
        if not cands:
            have = sorted({f"{LABELS.get(e.flavour, e.flavour)} {e.version} {e.precision} for {e.target}"
                           + (f" (refused by its gate on {e.info[PARITY_KEY].get('gpu')})"
                              if gate_state(e, gpu_cc) == "refused" else "")
                           for e in engines if e.graph == graph})
            need = ", ".join(f"{LABELS[k]} {v}" for k, v in usable_flavours.items())
            raise BackendUnavailable(f"no {graph} engine runs here: the bundle has {have or 'none'}; this machine "
                                     f"has sm{gpu_cc} with {need}. Build one with `{fix}`.{hopper}")
        chosen[graph] = cands[0]
    return chosen


class TensorRTBackend(WholeForecaster):
    name = "tensorrt"
    split: str | None = None  # the forecaster engine runs whole: no engines are built for the split graphs

    def __init__(self, bundle_dir: str, manifest: Manifest, precision: str = "fp16"):
        gpu_cc = _cuda.current_capability()
        if gpu_cc is None:
            raise BackendUnavailable("no CUDA GPU is visible to this process")
        chosen = select_engines(manifest, bundle_dir, gpu_cc, installed(), precision)
        for e in chosen.values():
            if gate_state(e, gpu_cc) == "not gated":
                log.warning("engine %s has not been checked against ONNX Runtime on a GPU (%s); `timecma-engines "
                            "build` on this machine builds one that is", e.file,
                            (e.info.get(PARITY_KEY) or {}).get("not_measured", "no gate record"))
        self.cuda = CudaRuntime()  # the first CUDA call beyond asking which GPU this is
        stream = self.cuda.stream()
        self.stream: int | None = stream  # None once closed
        self.runners: dict[str, EngineRunner] = {}
        try:
            for graph, entry in chosen.items():
                self.runners[graph] = EngineRunner(flavour_named(entry.flavour),
                                                   os.path.join(bundle_dir, entry.file), self.cuda, stream,
                                                   expected=EngineIO.from_manifest(entry))
        except BaseException:
            self.close()
            raise
        self.engines = chosen
        self.llm_precision = precision_tag(self.name, chosen["llm"].precision) if "llm" in chosen else FP32
        self.limits = {"forecast_batch": self.runners["forecaster"].limits["x"][0]}
        if "llm" in self.runners:
            llm = self.runners["llm"].limits
            self.limits.update(llm_batch=llm["input_ids"][0], llm_seq=llm["input_ids"][1])
        log.info("TensorRT engines on sm%s: %s (limits %s)", gpu_cc, ", ".join(e.file for e in chosen.values()),
                 self.limits)

    def run_llm(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.runners["llm"]({"input_ids": input_ids, "attention_mask": attention_mask})["last_hidden"]

    def run_forecaster(self, x: np.ndarray, prompt_emb: np.ndarray | None) -> np.ndarray:
        return self.runners["forecaster"](forecaster_feeds(x, prompt_emb))["y"]

    def close(self) -> None:
        for r in getattr(self, "runners", {}).values():
            r.close()
        self.runners = {}
        stream = getattr(self, "stream", None)
        if stream:
            self.cuda.destroy_stream(stream)
            self.stream = None
