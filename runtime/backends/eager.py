"""The eager PyTorch backend: the checkpoint a bundle came from, run as users run it today.

For comparison only (benchmarks' reference, parity checks). It is the one runtime module
allowed to import torch and training code, and it is imported only when asked for; the
import contracts in pyproject.toml name it as that exception.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from timecma.core.errors import BackendUnavailable, BundleError
from timecma.core.files import file_sha256
from timecma.core.manifest import Manifest
from timecma.core.scaling import Scaler
from timecma.core.store import precision_tag

from .base import WholeForecaster


def find_checkpoint(bundle_dir: str, manifest: Manifest, ckpt: str | None = None) -> str:
    """The checkpoint the bundle was exported from: ``ckpt``, else its file name next to the bundle
    (the default export layout, runs/x/best.pt -> runs/x/bundle/); checked by sha256."""
    origin = manifest.origin
    if origin.get("kind") != "timecma checkpoint" and not ckpt:
        raise BundleError(f"the torch backend needs a timecma checkpoint; this bundle came from {origin.get('kind')}")
    path = ckpt or os.path.join(os.path.dirname(os.path.abspath(bundle_dir)), origin.get("file", "best.pt"))
    if not os.path.exists(path):
        raise BundleError(f"the torch backend needs the checkpoint the bundle came from ({origin.get('file')}, "
                          f"sha256 {origin.get('sha256', '?')[:12]}...); not found at {path}: name it with "
                          f"--ckpt (timecma-bench) or ckpt= (make_backend)")
    if origin.get("sha256") and file_sha256(path) != origin["sha256"]:
        raise BundleError(f"{path} is not the checkpoint this bundle was exported from (sha256 differs)")
    return path


def llm_source(bundle_dir: str, manifest: Manifest, ckpt: str | None = None) -> str:
    """Where to load the bundle's LLM with transformers: its hub id, or the directory the checkpoint
    names (a local directory is recorded in the manifest by folder name only)."""
    if manifest.llm is None:
        raise BundleError(f"the bundle's model ({manifest.model_config.model}) has no LLM")
    if not manifest.llm.info.get("local_directory"):
        return manifest.llm.id
    from timecma.checkpoint import load_checkpoint

    return load_checkpoint(find_checkpoint(bundle_dir, manifest, ckpt))["llm"]["id"]


class TorchBackend(WholeForecaster):
    """Eager PyTorch on the checkpoint the bundle was exported from (for comparison only)."""

    limits: dict[str, int] = {}
    split: str | None = None  # the reference runs the forecaster whole, as a user's own script would

    def __init__(self, bundle_dir: str, manifest: Manifest, ckpt: str | None = None, device: str = "cpu",
                 dtype: str = "float32", compile: bool = False):
        """``compile``: both models through ``torch.compile`` (inductor, dynamic shapes), what a CPU user tries
        after eager bf16; compiled on the first calls, so measure after a warm-up."""
        try:
            import torch
        except ImportError as exc:
            raise BackendUnavailable("the torch backend needs torch (pip install timecma[train])") from exc

        from timecma.checkpoint import build_model, load_checkpoint
        from timecma.core.config import ModelConfig
        from timecma.llm import load_llm, recorded_layers

        tag = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
        # named as timecma-bench spells the row: torch, torch-bf16, torch-compile, torch-compile-bf16
        self.name = ("torch-compile" if compile else "torch") + ("" if tag == "fp32" else f"-{tag}")
        self.torch = torch
        c = load_checkpoint(find_checkpoint(bundle_dir, manifest, ckpt))
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.llm_precision = precision_tag("torch", tag)
        # modules, or what torch.compile makes of them
        self.model: Callable[..., Any] = build_model(ModelConfig(**c["model_config"]), c["state_dict"]).to(self.device)
        self.scaler = Scaler.from_contract(c["data"])  # the same scaling the exported graph applies
        # the plain Hugging Face forward: the eager baseline users run today
        self.llm: Callable[..., Any] | None = (load_llm(c["llm"]["id"], self.device, last_position_only=False,
                             layers=recorded_layers(c["llm"])).encoder.to(self.dtype)
                    if c["llm"] else None)  # models without the LLM branch
        if compile:
            self.model = torch.compile(self.model, dynamic=True)
            self.llm = torch.compile(self.llm, dynamic=True) if self.llm is not None else None

    def run_llm(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        assert self.llm is not None, "run_llm on a model without the LLM branch"
        t = self.torch
        with t.inference_mode():
            out = self.llm(t.from_numpy(input_ids).to(self.device), t.from_numpy(attention_mask).to(self.device))
            return out.float().cpu().numpy()

    def run_forecaster(self, x: np.ndarray, prompt_emb: np.ndarray | None) -> np.ndarray:
        t = self.torch
        with t.inference_mode():
            xs = t.from_numpy(self.scaler.transform(np.asarray(x, np.float64)).astype(np.float32)).to(self.device)
            emb = None if prompt_emb is None else t.from_numpy(np.asarray(prompt_emb, np.float32)).to(self.device)
            y = self.model(xs, emb).cpu().numpy().astype(np.float64)
            return self.scaler.inverse(y).astype(np.float32)

    def close(self) -> None:
        """Modules are freed with the object."""
