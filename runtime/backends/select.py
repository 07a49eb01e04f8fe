"""Which backends run here, and ``auto``'s choice among them (torch-free at module level).

``tensorrt``  native engines from the bundle (named I/O, set_input_shape, set_tensor_address,
              execute_async_v3 on a non-default stream, device buffers reused between calls)
``ort-cuda``  ONNX Runtime CUDA EP with IO binding; CUDA graphs for the fixed-shape forecaster
``openvino``  OpenVINO CPU in an accuracy-gated precision (f32, bf16, int8 weights, w8a8; ``openvino.py``)
``ort-cpu``   ONNX Runtime CPU (``ort.py``)
``torch``     eager PyTorch on the same weights (comparison only; ``eager.py``, imported on request)
"""

from __future__ import annotations

import importlib.util
import logging

from timecma.core.errors import BackendUnavailable
from timecma.core.manifest import Manifest

from ..engines import cuda
from ..engines.trt_flavour import installed
from .base import BACKENDS, Backend
from .ort import OrtBackend, ort_module

log = logging.getLogger(__name__)


def available_backends() -> dict[str, str]:
    """Backend name -> why it is (or is not) usable here."""
    out: dict[str, str] = {}
    flavours = {k: v for k, v in installed().items() if not v.startswith("not installed")}
    if not flavours:
        out["tensorrt"] = "no TensorRT flavour installed (pip install tensorrt-rtx, or NVIDIA's TensorRT)"
    else:
        out["tensorrt"] = "available" if cuda.device_count() > 0 else \
            f"{', '.join(f'{k} {v}' for k, v in flavours.items())} installed but no CUDA GPU is visible"
    try:
        providers = ort_module().get_available_providers()
        out["ort-cuda"] = "available" if "CUDAExecutionProvider" in providers else "onnxruntime has no CUDA provider"
        out["ort-cpu"] = "available"
    except ImportError:
        out["ort-cuda"] = out["ort-cpu"] = "onnxruntime not installed"
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


AUTO_ORDER = ("tensorrt", "ort-cuda", "openvino", "ort-cpu")
# what each backend accepts of the options `auto` was given (threads apply to every CPU backend)
_OPTIONS = {"ort-cpu": {"threads", "llm_variant"}, "ort-cuda": {"threads", "llm_variant", "cuda_graph"},
            "openvino": {"threads", "precision"}, "tensorrt": {"precision"}}


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
        from .openvino import OpenVinoBackend

        return OpenVinoBackend(bundle_dir, manifest, **kwargs)
    if name == "ort-cuda":
        return OrtBackend(bundle_dir, manifest, "cuda", **kwargs)
    if name == "torch":
        from .eager import TorchBackend  # torch only here, only on request

        return TorchBackend(bundle_dir, manifest, **kwargs)
    from .tensorrt import TensorRTBackend

    return TensorRTBackend(bundle_dir, manifest, **kwargs)
