"""Inference backends behind one small interface (torch-free at module level).

``tensorrt``  native engines from the bundle (named I/O, set_input_shape, set_tensor_address,
              execute_async_v3 on a non-default stream, device buffers reused between calls)
``ort-cuda``  ONNX Runtime CUDA EP with IO binding; CUDA graphs for the fixed-shape forecaster
``openvino``  OpenVINO CPU in an accuracy-gated precision (f32, bf16, int8 weights; ``openvino_backend.py``)
``ort-cpu``   ONNX Runtime CPU
``torch``     eager PyTorch on the same weights (comparison only; ``torch_backend.py``, imported on request)
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import numpy as np

from timecma.core.errors import BackendUnavailable, BundleError
from timecma.core.manifest import Manifest

from . import cuda

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "ort-cuda", "openvino", "ort-cpu", "torch")


class Backend(Protocol):
    name: str
    limits: dict[str, int]  # largest llm_batch / llm_seq / forecast_batch it accepts; {} = unbounded

    def close(self) -> None:
        """Free what the backend holds (device memory, sessions)."""

    def run_llm(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """[B,S] int64 x2 -> [B,d_llm] float32."""

    def run_forecaster(self, x: np.ndarray, prompt_emb: np.ndarray) -> np.ndarray:
        """[B,seq_len,N] raw, [B,N,d_llm] -> [B,pred_len,N] raw."""


def _ort():
    import onnxruntime as ort

    return ort


def available_backends() -> dict[str, str]:
    """Backend name -> why it is (or is not) usable here."""
    out: dict[str, str] = {}
    from .trt_flavour import installed

    flavours = {k: v for k, v in installed().items() if not v.startswith("not installed")}
    if not flavours:
        out["tensorrt"] = "no TensorRT flavour installed (pip install tensorrt-rtx, or NVIDIA's TensorRT)"
    else:
        out["tensorrt"] = "available" if cuda.device_count() > 0 else \
            f"{', '.join(f'{k} {v}' for k, v in flavours.items())} installed but no CUDA GPU is visible"
    try:
        providers = _ort().get_available_providers()
        out["ort-cuda"] = "available" if "CUDAExecutionProvider" in providers else "onnxruntime has no CUDA provider"
        out["ort-cpu"] = "available"
    except ImportError:
        out["ort-cuda"] = out["ort-cpu"] = "onnxruntime not installed"
    import importlib.util

    try:
        have_ov = importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # a module blocked or half-installed
        have_ov = False
    out["openvino"] = "available" if have_ov else "openvino not installed (pip install 'timecma[openvino]')"
    try:
        out["torch"] = "available" if importlib.util.find_spec("torch") else "torch not installed"
    except (ImportError, ValueError):
        out["torch"] = "torch not installed"
    return out


def ort_session(path: str, device: str = "cpu", threads: int | None = None, cuda_graph: bool = False):
    """The one ONNX Runtime session factory (serving, export's measurements, benchmarks): all graph
    optimisations; ``threads`` intra-op threads (None: ORT's choice); CUDA with optional CUDA graph."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    providers: list = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"}))
    return ort.InferenceSession(path, opts, providers=providers)


def forecaster_feeds(x: np.ndarray, prompt_emb: np.ndarray | None) -> dict[str, np.ndarray]:
    """The forecaster graph's inputs: the window, and the prompt embeddings where the model has an LLM branch."""
    feeds = {"x": np.ascontiguousarray(x, dtype=np.float32)}
    if prompt_emb is not None:
        feeds["prompt_emb"] = np.ascontiguousarray(prompt_emb, dtype=np.float32)
    return feeds


class OrtBackend:
    """ONNX Runtime on CPU, or CUDA with IO binding (outputs bound to host, inputs copied once)."""

    limits: dict[str, int] = {}

    def __init__(self, bundle_dir: str, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 llm_variant: str | None = None, cuda_graph: bool = True):
        ort = _ort()
        self.name = "ort-cuda" if device == "cuda" else "ort-cpu"
        self.device = device
        llm, fc = manifest.graphs.get("llm"), manifest.graphs["forecaster"]
        self.llm = self.llm_variant = None
        if llm is not None:  # models without the LLM branch have no LLM graph
            variant = llm_variant or (llm.cpu_preferred if device == "cpu" else "fp32")
            if variant not in llm.files:
                raise BundleError(f"bundle has no LLM graph variant {variant!r}; it has {sorted(llm.files)}")
            self.llm_variant = variant
            self.llm = ort_session(os.path.join(bundle_dir, llm.files[variant].file), device, threads)
        self.fc = ort_session(os.path.join(bundle_dir, fc.files["fp32"].file), device, threads,
                              cuda_graph=cuda_graph)
        # batch-1 requests on CPU: the graph and thread count export measured fastest
        self.fc1 = self.fc
        b1 = fc.cpu_batch1
        if device == "cpu" and b1:
            self.fc1 = ort_session(os.path.join(bundle_dir, b1.file), device, threads or b1.info.get("threads"))
        self._fc_graph = device == "cuda" and cuda_graph
        if self._fc_graph:
            cfg = manifest.model_config
            # CUDA graphs replay fixed device addresses: bind batch-1 buffers once, copy into them.
            self._x = ort.OrtValue.ortvalue_from_shape_and_type((1, cfg.seq_len, cfg.num_nodes), np.float32, "cuda", 0)
            self._y = ort.OrtValue.ortvalue_from_shape_and_type((1, cfg.pred_len, cfg.num_nodes), np.float32, "cuda", 0)
            self._binding = self.fc.io_binding()
            self._binding.bind_ortvalue_input("x", self._x)
            if llm is not None:
                self._e = ort.OrtValue.ortvalue_from_shape_and_type((1, cfg.num_nodes, cfg.d_llm), np.float32,
                                                                     "cuda", 0)
                self._binding.bind_ortvalue_input("prompt_emb", self._e)
            self._binding.bind_ortvalue_output("y", self._y)

    def run_llm(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self.device == "cpu":
            return self.llm.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]
        binding = self.llm.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_output("last_hidden", "cpu")
        self.llm.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def close(self) -> None:
        """ORT sessions are freed with the object."""

    def run_forecaster(self, x: np.ndarray, prompt_emb: np.ndarray | None) -> np.ndarray:
        feeds = forecaster_feeds(x, prompt_emb)
        if self._fc_graph and feeds["x"].shape[0] == 1:
            self._x.update_inplace(feeds["x"])
            if prompt_emb is not None:
                self._e.update_inplace(feeds["prompt_emb"])
            self.fc.run_with_iobinding(self._binding)
            return self._y.numpy()
        if self.device == "cuda":  # other batch sizes: a plain CUDA run, one at a time under the graph
            if not self._fc_graph:
                return self.fc.run(None, feeds)[0]
            return np.concatenate([self.run_forecaster(x[i:i + 1], None if prompt_emb is None else prompt_emb[i:i + 1])
                                   for i in range(len(x))])
        sess = self.fc1 if feeds["x"].shape[0] == 1 else self.fc
        return sess.run(None, feeds)[0]


AUTO_ORDER = ("tensorrt", "ort-cuda", "openvino", "ort-cpu")
# what each backend accepts of the options `auto` was given (threads apply to every CPU backend)
_OPTIONS = {"ort-cpu": {"threads", "llm_variant"}, "ort-cuda": {"threads", "llm_variant", "cuda_graph"},
            "openvino": {"threads", "precision"}, "tensorrt": {"precision"}}


THREADED = ("auto", "ort-cpu", "ort-cuda", "openvino")  # backends with a CPU thread count to set


def threads_option(backend: str, threads: int | None) -> dict:
    """``{"threads": n}`` for a backend that takes a thread count and a count that was given, else ``{}``."""
    return {"threads": threads} if threads and backend in THREADED else {}


def _kwargs_for(name: str, kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k in _OPTIONS.get(name, set())}


def make_backend(name: str, bundle_dir: str, manifest: Manifest, **kwargs) -> Backend:
    """Instantiate a backend by name; ``auto`` picks tensorrt > ort-cuda > openvino > ort-cpu by what is present."""
    avail = available_backends()
    if name == "auto":
        for cand in AUTO_ORDER:
            if avail.get(cand) == "available":
                try:
                    backend = make_backend(cand, bundle_dir, manifest, **_kwargs_for(cand, kwargs))
                except BackendUnavailable as exc:  # e.g. engines for another GPU: fall back, and say so
                    log.warning("%s unusable (%s); trying the next backend", cand, exc)
                    continue
                log.info("backend auto -> %s", cand)
                return backend
        raise BackendUnavailable(f"no usable backend: {avail}")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    if avail.get(name) != "available":
        raise BackendUnavailable(f"backend {name} is not usable here: {avail.get(name)}")
    if name == "ort-cpu":
        return OrtBackend(bundle_dir, manifest, "cpu", **kwargs)
    if name == "openvino":
        from .openvino_backend import OpenVinoBackend

        return OpenVinoBackend(bundle_dir, manifest, **kwargs)
    if name == "ort-cuda":
        return OrtBackend(bundle_dir, manifest, "cuda", **kwargs)
    if name == "torch":
        from .torch_backend import TorchBackend  # torch only here, only on request

        return TorchBackend(bundle_dir, manifest, **kwargs)
    from .tensorrt_backend import TensorRTBackend

    return TensorRTBackend(bundle_dir, manifest, **kwargs)
