"""Prompts for every (window, variable) of the training data, and their embeddings in the store."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Series, SplitWindows
from .llm import LoadedLLM, encode_last_token
from .core.prompts import PromptRenderer
from .core.store import EmbeddingStore
from .core.tokens import check_lengths, encode_prompts, plan_llm_batches

log = logging.getLogger(__name__)


@dataclass
class PromptSet:
    """Token ids and store keys of a split's prompts, window-major then variable."""

    split: str
    n_vars: int
    token_ids: list[np.ndarray]
    keys: list[bytes]
    prompts: list[str]

    def window_keys(self, i: int) -> list[bytes]:
        return self.keys[i * self.n_vars : (i + 1) * self.n_vars]


def build_prompt_set(
    series: Series, windows: SplitWindows, renderer: PromptRenderer, llm: LoadedLLM, store: EmbeddingStore
) -> PromptSet:
    """Render, tokenize and key every prompt of a split; refuse prompts longer than the LLM."""
    prompts = renderer.render_series(series.values, series.timestamps, windows.starts, windows.seq_len)
    token_ids = encode_prompts(llm.backend, prompts)
    n = len(series.variables)

    def describe(i: int) -> str:
        start = int(windows.starts[i // n])
        return (f"{windows.name} window starting at row {start} ({series.timestamps[start]}), "
                f"variable {series.variables[i % n]!r}")

    check_lengths(token_ids, llm.info.max_positions, describe)
    return PromptSet(windows.name, n, token_ids, store.keys(token_ids), prompts)


def precompute(
    store: EmbeddingStore,
    llm: LoadedLLM,
    token_ids: list[np.ndarray],
    keys: list[bytes],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    desc: str = "embeddings",
    prompts: list[str] | None = None,
) -> int:
    """Compute and store embeddings for keys not yet present; returns how many were computed.

    Batches group prompts of similar length (little padding) and each batch is one
    committed transaction, so a killed run resumes where it stopped. With ``prompts``
    (the texts behind ``token_ids``) the store's text index is filled too, so serving
    finds these prompts without tokenizing them.
    """
    todo = store.missing(keys)
    seen: dict[bytes, int] = {}
    for i in todo:
        seen.setdefault(keys[i], i)  # identical prompts are computed once
    unique = list(seen.values())
    if not unique:
        log.info("%s: all %d prompts already in the store", desc, len(keys))
        return 0
    sub = [token_ids[i] for i in unique]
    batches = plan_llm_batches([len(t) for t in sub], batch_size)
    with tqdm(total=len(unique), desc=desc, unit="prompt", mininterval=1.0, disable=None) as bar:  # None: TTY only
        for batch in batches:
            vecs = encode_last_token(llm, [sub[j] for j in batch], device)
            store.put_many([keys[unique[j]] for j in batch], vecs,
                           None if prompts is None else [prompts[unique[j]] for j in batch])
            bar.update(len(batch))
    return len(unique)
