"""The one interface every engine kind implements, and what all of them share.

A backend runs the two graphs of a bundle: the LLM (token ids -> last hidden state) and the
forecaster (window + prompt embeddings -> forecast in raw units). It may import
``timecma.core`` and ``runtime.engines``; nothing above it (serving, build).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

BACKENDS = ("tensorrt", "ort-cuda", "openvino", "ort-cpu", "torch")


class Backend(Protocol):
    name: str
    limits: dict[str, int]  # largest llm_batch / llm_seq / forecast_batch it accepts; {} = unbounded
    llm_precision: str  # the LLM stage's precision class (core.store.precision_tag): the store keys its vectors by it

    def close(self) -> None:
        """Free what the backend holds (device memory, sessions)."""

    def run_llm(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """[B,S] int64 x2 -> [B,d_llm] float32."""

    def run_forecaster(self, x: np.ndarray, prompt_emb: np.ndarray) -> np.ndarray:
        """[B,seq_len,N] raw, [B,N,d_llm] -> [B,pred_len,N] raw."""


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
