"""The one place that imports TensorRT: standard TensorRT (``tensorrt``, 10.x/11.x, datacenter
GPUs) or TensorRT for RTX (``tensorrt_rtx``, from PyPI, builds on a CPU-only machine).

Both share the network, builder and execution API; what differs lives here:

* standard builds need the GPU they target (engine = that compute capability) and keep a
  timing cache between builds;
* RTX builds ahead of time without a GPU, portable across compute capability 8.6/8.9/12.0 by
  default (or the listed ones), has no timing cache (a no-op since 1.2), and finishes kernels
  just in time at load, which its runtime cache keeps between processes.

Both are strongly typed only here: precision lives in the ONNX graph (TensorRT 10.12
deprecated and 11 removed weakly typed networks; RTX never had BuilderFlag.FP16).
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from timecma.core.errors import BackendUnavailable, InputError
from timecma.core.files import atomic_write_bytes, user_cache_dir

log = logging.getLogger(__name__)

FLAVOURS = {"standard": "tensorrt", "rtx": "tensorrt_rtx"}  # CLI choice -> module / manifest name
LABELS = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}
RTX_PORTABLE = ["86", "89", "120"]  # TensorRT-RTX's default targets (Ampere/Ada/Blackwell RTX-class parts)
RTX_EXPLICIT = {"75", "80", "86", "89", "120", "121"}  # ComputeCapability.SM* of tensorrt_rtx 1.7


def _import(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a stub package that raises on import
        hint = ("pip install tensorrt-rtx" if module == "tensorrt_rtx"
                else "install TensorRT from NVIDIA (its libs are not on PyPI)")
        raise BackendUnavailable(f"{LABELS[module]} is not installed ({type(exc).__name__}: {exc}); {hint}") from exc


def installed() -> dict[str, str]:
    """Flavour -> version, or why it cannot be imported (``not installed: ...``)."""
    out = {}
    for name in FLAVOURS.values():
        try:
            out[name] = _import(name).__version__
        except BackendUnavailable as exc:
            out[name] = f"not installed: {exc}"
    return out


class _Logger:
    """A TensorRT logger that keeps warnings and errors (they go into the manifest)."""

    def __new__(cls, trt: ModuleType):
        base: Any = trt.ILogger  # the class of whichever flavour was imported, known only at run time

        class Logger(base):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.messages: list[str] = []

            def log(self, severity, msg) -> None:  # noqa: A003 - TensorRT's name
                if severity <= trt.ILogger.Severity.WARNING:
                    self.messages.append(f"{severity.name}: {msg}")
                    log.log(logging.ERROR if severity <= trt.ILogger.Severity.ERROR else logging.DEBUG,
                            "%s: %s", LABELS[trt.__name__], msg)

        return Logger()


@dataclass
class Flavour:
    """An installed TensorRT flavour and its few differences."""

    name: str  # "tensorrt" | "tensorrt_rtx"
    trt: ModuleType = field(repr=False)

    @property
    def version(self) -> str:
        return self.trt.__version__

    @property
    def label(self) -> str:
        return f"{LABELS[self.name]} {self.version}"

    @property
    def tag(self) -> str:
        """Engine file-name component: trt10.13.0.35 or trtrtx1.7.1.116."""
        return ("trtrtx" if self.name == "tensorrt_rtx" else "trt") + self.version

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    def logger(self):
        return _Logger(self.trt)

    # -- build ------------------------------------------------------------------------
    def build_targets(self, requested: list[str] | None, gpu_cc: str | None) -> tuple[list[str], bool]:
        """(compute capabilities the engine will run on, portable?) or BackendUnavailable/ValueError."""
        if self.is_rtx:
            if not requested:
                return list(RTX_PORTABLE), True
            bad = [c for c in requested if c not in RTX_EXPLICIT]
            if bad:
                raise InputError(f"TensorRT-RTX {self.version} cannot target compute capability {bad}; it builds for "
                                 f"{sorted(RTX_EXPLICIT, key=int)} (Hopper, sm90, needs standard TensorRT)")
            return sorted(set(requested), key=int), False
        if gpu_cc is None:
            raise BackendUnavailable(f"{self.label} builds engines only on the GPU they are for, and no CUDA GPU "
                                     "is visible here (TensorRT-RTX, `--trt-flavour rtx`, builds without one)")
        if requested and requested != [gpu_cc]:
            raise InputError(f"standard TensorRT builds for the GPU it runs on (sm{gpu_cc}), not {requested}")
        return [gpu_cc], False

    def create_network(self, builder):
        flag = 1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return builder.create_network(flag)

    def configure(self, config, targets: list[str], portable: bool) -> Any:
        """Per-flavour builder settings; returns a state object for ``after_build``."""
        if self.is_rtx:
            if not portable:
                config.num_compute_capabilities = len(targets)
                for i, cc in enumerate(targets):
                    if not config.set_compute_capability(getattr(self.trt.ComputeCapability, f"SM{cc}"), i):
                        raise InputError(f"TensorRT-RTX refused compute capability {cc}")
            return None
        path = os.path.join(user_cache_dir("tensorrt"), f"timing-{self.version}-sm{targets[0]}.cache")
        blob = b""
        if os.path.exists(path):
            with open(path, "rb") as f:
                blob = f.read()
        config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
        return path

    def after_build(self, config, state: Any) -> None:
        if state:  # standard: persist the timing cache for the next build on this GPU
            atomic_write_bytes(state, bytes(memoryview(config.get_timing_cache().serialize())))

    # -- run --------------------------------------------------------------------------
    def runtime_cache_path(self, gpu_cc: str) -> str:
        return os.path.join(user_cache_dir("tensorrt_rtx"), f"runtime-{self.version}-sm{gpu_cc}.cache")

    def create_context(self, engine, gpu_cc: str):
        """(execution context, runtime-cache state). RTX: a runtime cache from the user cache dir."""
        if not self.is_rtx:
            return engine.create_execution_context(), None
        rc = engine.create_runtime_config()
        cache = rc.create_runtime_cache()
        path = self.runtime_cache_path(gpu_cc)
        if os.path.exists(path):
            with open(path, "rb") as f:
                if not cache.deserialize(f.read()):
                    log.warning("ignoring an unreadable TensorRT-RTX runtime cache %s", path)
        rc.set_runtime_cache(cache)
        return engine.create_execution_context(rc), (cache, path)

    def save_runtime_cache(self, state: Any) -> None:
        if state:
            cache, path = state
            try:
                atomic_write_bytes(path, bytes(memoryview(cache.serialize())))
            except OSError as exc:
                log.warning("could not save the TensorRT-RTX runtime cache %s: %s", path, exc)


def load_flavour(choice: str = "auto") -> Flavour:
    """``standard``, ``rtx`` or ``auto`` (standard where importable, else RTX)."""
    if choice not in ("auto", *FLAVOURS):
        raise InputError(f"unknown TensorRT flavour {choice!r}; choose auto, standard or rtx")
    order = list(FLAVOURS) if choice == "auto" else [choice]
    reasons = []
    for c in order:
        try:
            return Flavour(FLAVOURS[c], _import(FLAVOURS[c]))
        except BackendUnavailable as exc:
            reasons.append(str(exc))
    raise BackendUnavailable("; ".join(reasons))


def flavour_named(name: str) -> Flavour:
    """The installed flavour recorded in a manifest as ``tensorrt`` or ``tensorrt_rtx``."""
    return Flavour(name, _import(name))
