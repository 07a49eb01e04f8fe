"""TensorRT engine builds from the bundle's ONNX graphs (switched on when `import tensorrt` works).

TensorRT 10.12 deprecated and 11 removed weakly typed networks (no BuilderFlag.FP16): the
precision lives in the ONNX graph (the fp16 variant from ``convert_fp16``) and the network
is created STRONGLY_TYPED. Engines only run on the GPU generation and TensorRT version they
were built with, so their names carry precision, compute capability, TensorRT version and
the ONNX file's hash.

Not verified on this project's development machines (no TensorRT can be installed there).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


def tensorrt_status() -> tuple[bool, str]:
    """(available, reason) — TensorRT importable and a CUDA GPU present."""
    try:
        import tensorrt as trt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken stub package
        return False, f"TensorRT is not installed ({type(exc).__name__}: {exc})"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "TensorRT is installed but no CUDA GPU is visible"
    except ImportError:
        return False, "torch is needed at export time to query the GPU"
    return True, f"TensorRT {trt.__version__}"


def gpu_compute_capability() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


@dataclass
class EngineSpec:
    graph: str  # "llm" or "forecaster"
    precision: str  # "fp16" or "fp32": the precision of the ONNX graph it is built from
    onnx_file: str
    onnx_sha256: str
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)

    def file_name(self, trt_version: str, sm: str) -> str:
        return f"{self.graph}.{self.precision}.sm{sm}.trt{trt_version}.{self.onnx_sha256[:12]}.plan"


def build_engine(spec: EngineSpec, bundle_dir: str, timing_cache_path: str, workspace_gib: float = 4.0) -> dict:
    """Build one strongly typed engine with one optimization profile; persist the timing cache."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    onnx_path = os.path.join(bundle_dir, spec.onnx_file)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {spec.onnx_file}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache_bytes = b""
    if os.path.exists(timing_cache_path):
        with open(timing_cache_path, "rb") as f:
            cache_bytes = f.read()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in spec.profile.items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {spec.onnx_file}")
    sm = gpu_compute_capability()
    name = spec.file_name(trt.__version__, sm)
    os.makedirs(os.path.join(bundle_dir, "engines"), exist_ok=True)
    with open(os.path.join(bundle_dir, "engines", name), "wb") as f:
        f.write(plan)
    with open(timing_cache_path, "wb") as f:
        f.write(config.get_timing_cache().serialize())
    log.info("built TensorRT engine %s", name)
    return {
        "graph": spec.graph, "precision": spec.precision, "file": f"engines/{name}",
        "compute_capability": sm, "tensorrt": trt.__version__, "onnx_sha256": spec.onnx_sha256,
        "profile": {k: [list(s) for s in v] for k, v in spec.profile.items()},
    }


def run_engine(bundle_dir: str, engine_file: str, feeds: dict) -> "object":
    """Run an engine once on numpy feeds (torch CUDA tensors as buffers); returns the first output.

    Used only for export-time parity; the serving path lives in timecma.runtime.
    """
    import numpy as np
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    with open(os.path.join(bundle_dir, engine_file), "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    keep = {}
    for name, arr in feeds.items():
        t = torch.from_numpy(np.ascontiguousarray(arr)).cuda()
        keep[name] = t
        context.set_input_shape(name, tuple(arr.shape))
        context.set_tensor_address(name, t.data_ptr())
    out_name = next(engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                    if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT)
    out = torch.empty(tuple(context.get_tensor_shape(out_name)), dtype=torch.float32, device="cuda")
    context.set_tensor_address(out_name, out.data_ptr())
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError(f"TensorRT execution of {engine_file} failed")
    stream.synchronize()
    return out.cpu().numpy()
