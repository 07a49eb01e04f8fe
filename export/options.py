"""Export's options, its error, the bundle's graph file names, and the units errors are reported in.

The lowest floor of export besides ``onnx_export``: every step imports it, it imports no step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from timecma.core.config import DataContract, ModelConfig
from timecma.core.errors import InputError
from timecma.core.scaling import Scaler
from timecma.data import split_borders

LLM_ONNX = "llm_last_token.onnx"
FORECASTER_ONNX = "forecaster.onnx"
FORECASTER_B1_ONNX = "forecaster.b1.onnx"
# the batch-1 forecaster in two graphs: embeddings -> encoded prompts (kept per window), then the head
FORECASTER_SPLIT_ONNX = {"prompt_encoder": "forecaster.prompt_encoder.onnx", "head": "forecaster.head.onnx"}


class ExportError(InputError):
    """Export cannot produce a correct bundle (parity beyond tolerance, wrong LLM, bad input)."""


@dataclass
class ExportOptions:
    out_dir: str
    force: bool = False
    data_path: str | None = None
    llm_id: str | None = None
    tolerance: float = 1e-4
    parity_windows: int = 8
    tensorrt: str = "build"  # build (where a flavour is installed) | require | skip
    trt_flavour: str = "auto"  # auto | standard | rtx
    # LLM engine profile; None: default_profile's (runtime/compile/tensorrt.py), from the bundle's own prompts
    trt_batch: tuple[int, int, int] | None = None  # prompts per LLM call: min, opt, max; default (1, N, 64)
    trt_seq: tuple[int, int, int] | None = None  # tokens; default opt the validation prompts' padded length
    trt_forecast_batch: tuple[int, int, int] = (1, 1, 64)
    trt_precisions: tuple[str, ...] = ("fp16",)
    trt_targets: tuple[str, ...] = ()  # compute capabilities (RTX); empty = the flavour's default
    # opt-in int8 LLM graphs for ONNX Runtime ("int8" dynamic, "w8a8" static), each kept only if it passes its gate
    quantize: tuple[str, ...] = ()
    quantize_windows: int = 64
    openvino: str = "auto"  # auto: gate OpenVINO variants where openvino is installed | build: require it | skip
    gate_windows: int = 32  # validation windows stored for the accuracy gate of lower precisions
    fp16_gate: float = 1e-2  # fp16 graphs: worst per-prompt embedding error (relative) / forecast change (normalised)
    extra: dict = field(default_factory=dict)


def errors(a: np.ndarray, b: np.ndarray) -> dict:
    """Max abs, max rel and mean abs difference of ``a`` against the reference ``b``."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {"max_abs": float(diff.max()), "max_rel": float((diff / (np.abs(b) + 1e-6)).max()),
            "mean_abs": float(diff.mean())}


def report_norm(series, data: DataContract, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the training rows: the units parity and accuracy are reported in, whatever
    scaler the model uses (the paper's normalised scale)."""
    b = split_borders(len(series.values), cfg.seq_len, data.split, series.frequency)["train"]
    sc = Scaler.fit(series.values[b[0]:b[1]], data.variables)
    return sc.mean, sc.std
