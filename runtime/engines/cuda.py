"""The CUDA runtime calls the TensorRT engines need, through ctypes (no torch, no CUDA Python).

This is the project's one libcudart loader: the engine runner, the backend probe and the
engine builder all use it. libcudart comes from a system CUDA install or from NVIDIA's pip
wheel (`nvidia-cuda-runtime`, pulled in by ``pip install timecma[gpu]``), which is not on
the loader's default path, so the wheel's folders are searched too.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import site
import sys
from functools import lru_cache

from timecma.core.errors import BackendUnavailable

log = logging.getLogger(__name__)

H2D, D2H = 1, 2  # cudaMemcpyKind
_ATTR_CC_MAJOR, _ATTR_CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor


def _candidates() -> list[str]:
    names = ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    roots = [p for p in (*site.getsitepackages(), site.getusersitepackages(), *sys.path) if os.path.isdir(p)]
    for root in dict.fromkeys(roots):  # NVIDIA's pip wheels: nvidia/cuda_runtime/lib, nvidia/cu13/lib
        names += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcudart.so*")), reverse=True)
    return names


@lru_cache(maxsize=1)
def _load() -> ctypes.CDLL:
    errors = []
    for name in _candidates():
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise BackendUnavailable("the CUDA runtime library (libcudart) was not found: install a CUDA driver and "
                             "`pip install timecma[gpu]` (brings nvidia-cuda-runtime)")


def device_count() -> int:
    """CUDA devices visible to this process; 0 when there is no driver, library or GPU."""
    try:
        lib = _load()
    except BackendUnavailable:
        return 0
    n = ctypes.c_int(0)
    return n.value if lib.cudaGetDeviceCount(ctypes.byref(n)) == 0 else 0


def current_capability() -> str | None:
    """Compute capability of the current CUDA device as digits ('86', '90', '120'); None where no CUDA
    GPU is visible. The one question build, ``verify`` and the TensorRT backend ask about the GPU before
    anything runs on it (tests supply the answer here to drive those paths on a CPU-only machine)."""
    if device_count() == 0:
        return None
    return CudaRuntime().capability()


def _address(handle: ctypes.c_void_p, what: str) -> int:
    """The address a successful call wrote (ctypes reads a NULL pointer as None)."""
    if handle.value is None:
        raise RuntimeError(f"{what} succeeded but gave a NULL pointer")
    return handle.value


class CudaRuntime:
    """Allocation, copies and streams on the current device. Raise on any CUDA error."""

    def __init__(self) -> None:
        self.lib = _load()
        if device_count() == 0:
            raise BackendUnavailable("no CUDA GPU is visible to this process")

    def check(self, err: int, what: str) -> None:
        if err != 0:
            self.lib.cudaGetErrorString.restype = ctypes.c_char_p
            msg = self.lib.cudaGetErrorString(err)
            raise RuntimeError(f"CUDA error {err} in {what}: {msg.decode() if msg else '?'}")

    def capability(self) -> str:
        """Compute capability of the current device as digits, e.g. '86', '90', '120'."""
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.cudaGetDevice(ctypes.byref(dev)), "cudaGetDevice")
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, dev), "cudaDeviceGetAttribute")
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, dev), "cudaDeviceGetAttribute")
        return f"{major.value}{minor.value}"

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes on the current device."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.check(self.lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
        return free.value, total.value

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), f"cudaMalloc({nbytes})")
        return _address(ptr, "cudaMalloc")

    def free(self, ptr: int) -> None:
        self.check(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreateWithFlags(ctypes.byref(s), 1), "cudaStreamCreate")  # non-blocking
        return _address(s, "cudaStreamCreate")

    def destroy_stream(self, stream: int) -> None:
        self.check(self.lib.cudaStreamDestroy(ctypes.c_void_p(stream)), "cudaStreamDestroy")

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                                            kind, ctypes.c_void_p(stream)), "cudaMemcpyAsync")

    def sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")
