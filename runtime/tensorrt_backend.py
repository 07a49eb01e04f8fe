"""TensorRT backend: engines from the bundle, driven through the TensorRT Python API and
the CUDA runtime via ctypes (no torch, no extra CUDA package).

Unverified on this project's development machines: TensorRT cannot be installed there.
"""

from __future__ import annotations

import ctypes
import logging
import os

import numpy as np

from timecma.manifest import BundleError

log = logging.getLogger(__name__)

_H2D, _D2H = 1, 2  # cudaMemcpyKind


class _CudaRT:
    """The few CUDA runtime calls the engines need."""

    def __init__(self):
        for lib in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
            try:
                self.lib = ctypes.CDLL(lib)
                break
            except OSError:
                continue
        else:
            raise BundleError("the CUDA runtime library (libcudart) was not found")

    def check(self, err: int, what: str) -> None:
        if err != 0:
            raise RuntimeError(f"CUDA error {err} in {what}")

    def capability(self) -> str:
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.cudaGetDevice(ctypes.byref(dev)), "cudaGetDevice")
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, dev), "compute capability")
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, dev), "compute capability")
        return f"{major.value}{minor.value}"

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")
        return ptr.value

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreateWithFlags(ctypes.byref(s), 1), "cudaStreamCreate")  # non-blocking
        return s.value

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                                            kind, ctypes.c_void_p(stream)), "cudaMemcpyAsync")

    def sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")


class _Engine:
    """One engine with device buffers sized for its profile's max shapes, reused between calls."""

    def __init__(self, trt, runtime, cuda: _CudaRT, path: str, stream: int):
        with open(path, "rb") as f:
            self.engine = runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise BundleError(f"TensorRT could not load {path}")
        self.context = self.engine.create_execution_context()
        self.cuda, self.stream, self.trt = cuda, stream, trt
        self.buffers: dict[str, tuple[int, int]] = {}
        self.inputs, self.output = [], None
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(name)
                shape = self.engine.get_tensor_profile_shape(name, 0)[2]  # max
            else:
                self.output = name
                shape = None
            self.buffers[name] = (0, 0) if shape is None else (cuda.malloc(int(np.prod(shape)) * dtype.itemsize), 0)
        self._out_capacity = 0

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        for name in self.inputs:
            arr = np.ascontiguousarray(feeds[name])
            ptr = self.buffers[name][0]
            self.context.set_input_shape(name, arr.shape)
            self.cuda.copy(ptr, arr.ctypes.data, arr.nbytes, _H2D, self.stream)
            self.context.set_tensor_address(name, ptr)
        shape = tuple(self.context.get_tensor_shape(self.output))
        out = np.empty(shape, dtype=np.float32)
        if out.nbytes > self._out_capacity:  # grow once, then reuse
            self.buffers[self.output] = (self.cuda.malloc(out.nbytes), out.nbytes)
            self._out_capacity = out.nbytes
        self.context.set_tensor_address(self.output, self.buffers[self.output][0])
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self.cuda.copy(out.ctypes.data, self.buffers[self.output][0], out.nbytes, _D2H, self.stream)
        self.cuda.sync(self.stream)
        return out


def select_engines(engines: list[dict], sm: str, trt_version: str, precision: str = "fp16") -> dict[str, dict]:
    """The bundle's engines for this GPU and TensorRT version, one per graph; refuse others.

    Engines only run on the GPU generation and TensorRT version they were built with, so a
    mismatch is an error that says how to rebuild, never a silent attempt.
    """
    if not engines:
        raise BundleError("the bundle has no TensorRT engines (exported without TensorRT)")
    usable = [e for e in engines if e["compute_capability"] == sm and e["tensorrt"] == trt_version]
    chosen = {}
    for graph in ("llm", "forecaster"):
        cands = sorted((e for e in usable if e["graph"] == graph), key=lambda e: e["precision"] != precision)
        if not cands:
            built = sorted({f"sm{e['compute_capability']}/TensorRT {e['tensorrt']}" for e in engines})
            raise BundleError(f"no {graph} engine for this GPU (sm{sm}, TensorRT {trt_version}); the bundle has "
                              f"{built}. Rebuild with `timecma-export --force` on this machine")
        chosen[graph] = cands[0]
    return chosen


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, bundle_dir: str, manifest: dict, precision: str = "fp16"):
        import tensorrt as trt

        cuda = _CudaRT()
        chosen = select_engines(manifest.get("engines", []), cuda.capability(), trt.__version__, precision)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.stream = cuda.stream()
        self.llm = _Engine(trt, runtime, cuda, os.path.join(bundle_dir, chosen["llm"]["file"]), self.stream)
        self.fc = _Engine(trt, runtime, cuda, os.path.join(bundle_dir, chosen["forecaster"]["file"]), self.stream)
        log.info("TensorRT engines: %s, %s", chosen["llm"]["file"], chosen["forecaster"]["file"])

    def run_llm(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.llm({"input_ids": input_ids, "attention_mask": attention_mask})

    def run_forecaster(self, x: np.ndarray, prompt_emb: np.ndarray) -> np.ndarray:
        return self.fc({"x": np.asarray(x, np.float32), "prompt_emb": np.asarray(prompt_emb, np.float32)})
