"""One TensorRT engine runner, used by serving and by the engine builder's parity check.

Named I/O, ``set_input_shape`` (its result checked), ``set_tensor_address`` and
``execute_async_v3`` on a non-blocking stream; device buffers sized once for the profile's
largest shapes and reused. Feeds are checked against the engine before anything is copied:
a name, dtype, rank or dimension outside the built profile is an error that says so, never
a write past a buffer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from timecma.core.errors import BackendUnavailable, BundleError, InputError
from timecma.core.manifest import Engine

from .cuda import D2H, H2D, CudaRuntime
from .trt_flavour import Flavour

log = logging.getLogger(__name__)


class EngineShapeError(InputError):
    """A feed does not fit the engine (name, dtype, rank or a dimension outside its profile)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    min_shape: tuple[int, ...]  # inputs: the profile's min; outputs: the static dims, -1 dynamic
    max_shape: tuple[int, ...]


@dataclass(frozen=True)
class EngineIO:
    """What an engine accepts and returns; from the engine itself or from a manifest entry."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @classmethod
    def from_manifest(cls, entry: Engine) -> "EngineIO":
        """From an engine entry's ``network`` (I/O as parsed) and ``profile`` (min, opt, max)."""
        net, prof = entry.network, entry.profile
        ins = {n: TensorSpec(n, t["dtype"], tuple(prof[n][0]), tuple(prof[n][2])) for n, t in net["inputs"].items()}
        outs = {n: TensorSpec(n, t["dtype"], tuple(t["shape"]), tuple(t["shape"])) for n, t in net["outputs"].items()}
        return cls(ins, outs)

    def check(self, feeds: dict[str, np.ndarray]) -> None:
        missing = sorted(set(self.inputs) - set(feeds))
        extra = sorted(set(feeds) - set(self.inputs))
        if missing or extra:
            raise EngineShapeError(f"engine inputs are {sorted(self.inputs)}; missing {missing}, unexpected {extra}")
        for name, spec in self.inputs.items():
            arr = feeds[name]
            if arr.dtype != np.dtype(spec.dtype):
                raise EngineShapeError(f"input {name!r} has dtype {arr.dtype}; the engine takes {spec.dtype}")
            if arr.ndim != len(spec.max_shape):
                raise EngineShapeError(f"input {name!r} has shape {list(arr.shape)}; the engine takes rank "
                                       f"{len(spec.max_shape)}")
            for d, (n, lo, hi) in enumerate(zip(arr.shape, spec.min_shape, spec.max_shape)):
                if not lo <= n <= hi:
                    raise EngineShapeError(f"input {name!r} dimension {d} is {n}, outside the engine's profile "
                                           f"[{lo}, {hi}] (shape {list(arr.shape)}); rebuild the engine with a larger "
                                           "profile (`timecma-engines build --max-batch/--max-seq`)")


class EngineRunner:
    """A deserialized engine with its context, stream and device buffers. ``close()`` frees them."""

    def __init__(self, flavour: Flavour, plan_path: str, cuda: CudaRuntime | None = None,
                 stream: int | None = None, expected: EngineIO | None = None):
        trt = flavour.trt
        self.flavour, self.path = flavour, plan_path
        self.cuda = cuda or CudaRuntime()
        self._own_stream = stream is None
        self.stream = self.cuda.stream() if stream is None else stream
        self._buffers: dict[str, int] = {}
        self._closed = False
        self.gpu_cc = self.cuda.capability()
        self._logger = flavour.logger()
        self._runtime = trt.Runtime(self._logger)
        with open(plan_path, "rb") as f:
            plan = f.read()
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            self.close()
            detail = "; ".join(self._logger.messages[-3:]) or "no message"
            raise BackendUnavailable(f"{flavour.label} could not load {os.path.basename(plan_path)} on this GPU "
                                     f"(sm{self.gpu_cc}): {detail}")
        self.context, self._cache_state = flavour.create_context(self.engine, self.gpu_cc)
        self.io = self._read_io(trt)
        if expected is not None and (expected.inputs.keys() != self.io.inputs.keys()
                                     or expected.outputs.keys() != self.io.outputs.keys()):
            raise BundleError(f"{plan_path}: engine I/O {sorted(self.io.inputs)} -> {sorted(self.io.outputs)} differs "
                              "from the manifest's; rebuild it with `timecma-engines build`")
        # device buffers for the largest shapes the profile allows: sized once, reused by every call
        for name, spec in self.io.inputs.items():
            if not self.context.set_input_shape(name, spec.max_shape):
                raise BundleError(f"{plan_path}: set_input_shape({name}, {spec.max_shape}) failed at the profile max")
        self._max_out = {n: tuple(self.context.get_tensor_shape(n)) for n in self.io.outputs}
        for name, spec in self.io.inputs.items():
            self._buffers[name] = self.cuda.malloc(int(np.prod(spec.max_shape)) * np.dtype(spec.dtype).itemsize)
        for name, spec in self.io.outputs.items():
            self._buffers[name] = self.cuda.malloc(int(np.prod(self._max_out[name])) * np.dtype(spec.dtype).itemsize)
        for name, ptr in self._buffers.items():
            self.context.set_tensor_address(name, ptr)

    def _read_io(self, trt) -> EngineIO:
        ins, outs = {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))).name
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                mn, _, mx = self.engine.get_tensor_profile_shape(name, 0)
                ins[name] = TensorSpec(name, dtype, tuple(mn), tuple(mx))
            else:
                shape = tuple(self.engine.get_tensor_shape(name))
                outs[name] = TensorSpec(name, dtype, shape, shape)
        return EngineIO(ins, outs)

    @property
    def limits(self) -> dict[str, tuple[int, ...]]:
        """Input name -> the largest shape the profile allows."""
        return {n: s.max_shape for n, s in self.io.inputs.items()}

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError(f"engine {os.path.basename(self.path)} is closed")
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        self.io.check(feeds)
        for name, arr in feeds.items():
            if not self.context.set_input_shape(name, arr.shape):
                raise EngineShapeError(f"TensorRT refused shape {list(arr.shape)} for input {name!r}")
            self.cuda.copy(self._buffers[name], arr.ctypes.data, arr.nbytes, H2D, self.stream)
        outs = {}
        for name, spec in self.io.outputs.items():
            outs[name] = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=spec.dtype)
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError(f"{self.flavour.label}: execute_async_v3 failed for {os.path.basename(self.path)}")
        for name, out in outs.items():
            self.cuda.copy(out.ctypes.data, self._buffers[name], out.nbytes, D2H, self.stream)
        self.cuda.sync(self.stream)
        return outs

    def close(self) -> None:
        """Free device memory and the stream; keep the RTX runtime cache. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if getattr(self, "_cache_state", None):
            self.flavour.save_runtime_cache(self._cache_state)
        for attr in ("context", "engine"):  # the context before the engine, before the memory
            if hasattr(self, attr):
                delattr(self, attr)
        for ptr in self._buffers.values():
            self.cuda.free(ptr)
        self._buffers.clear()
        if self._own_stream:
            self.cuda.destroy_stream(self.stream)

    def __enter__(self) -> "EngineRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA library may be gone
            pass
