"""The one interface every engine kind implements, and what all of them share.

A backend runs the two graphs of a bundle: the LLM (token ids -> last hidden state) and the
forecaster (window + prompt embeddings -> forecast in raw units). It may import
``timecma.core`` and ``runtime.engines``; nothing above it (serving, build).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from timecma.core.manifest import Manifest

BACKENDS = ("tensorrt", "ort-cuda", "openvino", "ort-cpu", "torch")


class Backend(Protocol):
    name: str
    limits: dict[str, int]  # largest llm_batch / llm_seq / forecast_batch it accepts; {} = unbounded
    llm_precision: str  # the LLM stage's precision class (core.store.precision_tag): the store keys its vectors by it

    def close(self) -> None:
        """Free what the backend holds (device memory, sessions)."""

    def run_llm(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """[B,S] int64 x2 -> [B,d_llm] float32."""

    def run_forecaster(self, x: np.ndarray, prompt_emb: np.ndarray | None) -> np.ndarray:
        """[B,seq_len,N] raw, [B,N,d_llm] (None: a model without the LLM branch) -> [B,pred_len,N] raw."""

    # Optional (``split`` not None): the forecaster in two batch-1 graphs (the bundle's ``cpu_split``), so
    # serving can keep a window's encoded prompts. ``split`` names what computes them (graph digest and
    # precision): it is part of the stored record's key.
    split: str | None

    def run_prompt_encoder(self, prompt_emb: np.ndarray) -> np.ndarray:
        """[1,N,d_llm] embeddings -> [1,N,d_llm] encoded prompts."""

    def run_head(self, x: np.ndarray, prompt_enc: np.ndarray) -> np.ndarray:
        """[1,seq_len,N] raw, [1,N,d_llm] encoded prompts -> [1,pred_len,N] raw."""


class WholeForecaster:
    """For a backend that runs the forecaster graph whole (``split`` None): serving never asks it for the halves."""

    split: str | None = None

    def run_prompt_encoder(self, prompt_emb: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} runs the forecaster whole (its split is None)")

    def run_head(self, x: np.ndarray, prompt_enc: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} runs the forecaster whole (its split is None)")


# The head is ~0.35 ms of small ops: on one thread it is as fast as on two (GPT-2 size, 2 cores: ORT 0.37 vs 0.37 ms,
# OpenVINO 0.33 vs 0.91), and right after the prompt encoder a second pool's threads fight the first one's
# (prompt encoder + head back to back: 2.8 ms on one thread, 4.8 ms on two; the whole graph 2.7).
HEAD_THREADS = 1


def split_id(manifest: Manifest) -> str | None:
    """The ``split`` of a backend running the bundle's split forecaster graphs in fp32 (None: the bundle has none)."""
    fc = manifest.graphs["forecaster"]
    return f"{fc.cpu_split.prompt_encoder.info['sha256']}:fp32" if fc.cpu_split else None


def forecaster_feeds(x: np.ndarray, prompt_emb: np.ndarray | None) -> dict[str, np.ndarray]:
    """The forecaster graph's inputs: the window, and the prompt embeddings where the model has an LLM branch."""
    feeds = {"x": np.ascontiguousarray(x, dtype=np.float32)}
    if prompt_emb is not None:
        feeds["prompt_emb"] = np.ascontiguousarray(prompt_emb, dtype=np.float32)
    return feeds


THREADED = ("auto", "ort-cpu", "ort-cuda", "openvino")  # backends with a CPU thread count to set


def threads_option(backend: str, threads: int | None) -> dict:
    """``{"threads": n}`` for a backend that takes a thread count and a count that was given, else ``{}``."""
    return {"threads": threads} if threads and backend in THREADED else {}
