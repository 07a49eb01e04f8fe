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

from ..engines.cuda import CudaRuntime
from ..engines.trt_flavour import LABELS, RTX_EXPLICIT, RTX_PORTABLE, flavour_named, installed
from ..engines.trt_runner import EngineIO, EngineRunner
from .base import forecaster_feeds

log = logging.getLogger(__name__)


def build_command(bundle_dir: str, flavour: str, precision: str, gpu_cc: str | None = None) -> str:
    cmd = f"timecma-engines build {bundle_dir} --trt-flavour {'rtx' if flavour == 'tensorrt_rtx' else 'standard'}"
    cmd += f" --precision {precision}"
    if flavour == "tensorrt_rtx" and gpu_cc and gpu_cc in RTX_EXPLICIT and gpu_cc not in RTX_PORTABLE:
        cmd += f" --compute-capability {gpu_cc}"
    return cmd


def select_engines(manifest: Manifest, bundle_dir: str, gpu_cc: str, flavours: dict[str, str],
                   precision: str = "fp16") -> dict[str, Engine]:
    """One engine per graph that runs here: an installed flavour of the same version, this GPU among
    its targets, built from the bundle's current ONNX graph; the wanted precision first.

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
                 and gpu_cc in e.compute_capabilities and shas.get(e.onnx_file) == e.onnx_sha256]
        cands.sort(key=lambda e: (e.precision != precision, e.flavour != "tensorrt"))
        if not cands:
            have = sorted({f"{LABELS.get(e.flavour, e.flavour)} {e.version} {e.precision} for {e.target}"
                           for e in engines if e.graph == graph})
            need = ", ".join(f"{LABELS[k]} {v}" for k, v in usable_flavours.items())
            raise BackendUnavailable(f"no {graph} engine runs here: the bundle has {have or 'none'}; this machine "
                                     f"has sm{gpu_cc} with {need}. Build one with `{fix}`.{hopper}")
        chosen[graph] = cands[0]
    return chosen


class TensorRTBackend:
    name = "tensorrt"
    split = None  # the forecaster engine runs whole: no engines are built for the split graphs

    def __init__(self, bundle_dir: str, manifest: Manifest, precision: str = "fp16"):
        self.cuda = CudaRuntime()
        gpu_cc = self.cuda.capability()
        chosen = select_engines(manifest, bundle_dir, gpu_cc, installed(), precision)
        self.stream = self.cuda.stream()
        self.runners: dict[str, EngineRunner] = {}
        try:
            for graph, entry in chosen.items():
                self.runners[graph] = EngineRunner(flavour_named(entry.flavour),
                                                   os.path.join(bundle_dir, entry.file), self.cuda, self.stream,
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

    def run_forecaster(self, x: np.ndarray, prompt_emb: np.ndarray) -> np.ndarray:
        return self.runners["forecaster"](forecaster_feeds(x, prompt_emb))["y"]

    def close(self) -> None:
        for r in getattr(self, "runners", {}).values():
            r.close()
        self.runners = {}
        if getattr(self, "stream", None):
            self.cuda.destroy_stream(self.stream)
            self.stream = None
