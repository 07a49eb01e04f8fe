"""Prompts for every (window, variable) of the training data, and their embeddings in the store."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Series, SplitWindows
from .llm import LoadedLLM, encode_last_token
from .core.prompts import PromptRenderer
from .core.errors import InputError
from .core.ray_setup import RayPool
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
    series: Series, windows: SplitWindows, renderer: PromptRenderer, llm: LoadedLLM, store: EmbeddingStore | None
) -> PromptSet:
    """Render, tokenize and key every prompt of a split; refuse prompts longer than the LLM. Without a store
    (joint training: embeddings are computed every step) the prompts get no keys."""
    prompts = renderer.render_series(series.values, series.timestamps, windows.starts, windows.seq_len)
    token_ids = encode_prompts(llm.backend, prompts)
    n = len(series.variables)

    def describe(i: int) -> str:
        start = int(windows.starts[i // n])
        return (f"{windows.name} window starting at row {start} ({series.timestamps[start]}), "
                f"variable {series.variables[i % n]!r}")

    check_lengths(token_ids, llm.info.max_positions, describe)
    return PromptSet(windows.name, n, token_ids, store.keys(token_ids) if store is not None else [], prompts)


def _todo(store: EmbeddingStore, token_ids: list[np.ndarray], keys: list[bytes], batch_size: int):
    """Indices of the prompts still to compute (identical prompts once) and their length-grouped batches."""
    seen: dict[bytes, int] = {}
    for i in store.missing(keys):
        seen.setdefault(keys[i], i)
    unique = list(seen.values())
    return unique, plan_llm_batches([len(token_ids[i]) for i in unique], batch_size)


def precompute(
    store: EmbeddingStore,
    llm: LoadedLLM,
    token_ids: list[np.ndarray],
    keys: list[bytes],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    desc: str = "embeddings",
    prompts: list[str] | None = None,
    ray: RayPool | None = None,
    encoder: Callable[[list[np.ndarray]], np.ndarray] | None = None,
) -> int:
    """Compute and store embeddings for keys not yet present; returns how many were computed.

    Batches group prompts of similar length (little padding) and each batch is one
    committed transaction, so a killed run resumes where it stopped. With ``prompts``
    (the texts behind ``token_ids``) the store's text index is filled too, so serving
    finds these prompts without tokenizing them. With ``ray`` the same batches run on
    a pool of Ray actors, each with the LLM loaded once; this process stays the store's
    only writer. ``encoder`` (token ids -> [B, d_llm]) replaces eager PyTorch, e.g. a
    ``encoders.PromptEncoder`` (eager bf16, or the exported LLM graph on a runtime engine).
    """
    if ray is not None and encoder is not None:
        raise InputError("--ray precomputes on eager PyTorch actors; --precompute-backend is for one process")
    unique, batches = _todo(store, token_ids, keys, batch_size)
    if not unique:
        log.info("%s: all %d prompts already in the store", desc, len(keys))
        return 0

    def put(pos: np.ndarray, vecs: np.ndarray) -> None:
        idx = [unique[j] for j in pos]
        store.put_many([keys[i] for i in idx], vecs, None if prompts is None else [prompts[i] for i in idx])

    with tqdm(total=len(unique), desc=desc, unit="prompt", mininterval=1.0, disable=None) as bar:  # None: TTY only
        if ray is not None:
            for pos, vecs in _encode_on_ray(ray, llm, [[token_ids[unique[j]] for j in b] for b in batches], batches,
                                            device):
                put(pos, vecs)
                bar.update(len(pos))
        else:
            encode = encoder or (lambda ids: encode_last_token(llm, ids, device))
            for batch in batches:
                put(np.asarray(batch), encode([token_ids[unique[j]] for j in batch]))
                bar.update(len(batch))
    return len(unique)


class LLMWorker:
    """A Ray actor's callable: the LLM loaded once; one planned batch per call -> (positions, vectors)."""

    def __init__(self, llm_id: str, namespace: str, device: str, threads: int, layers: int | None = None):
        from .llm import load_llm

        torch.set_num_threads(threads)
        self.device = device
        self.llm = load_llm(llm_id, device, layers=layers)
        if self.llm.info.namespace != namespace:  # another model under the same name on this node
            raise InputError(f"LLM {llm_id!r} on this worker is not the driver's (store namespace "
                             f"{self.llm.info.namespace[:12]} != {namespace[:12]})")

    def __call__(self, row: dict) -> dict:
        ids = [np.asarray(t, dtype=np.int64) for t in row["ids"][0]]
        return {"pos": np.asarray(row["pos"][0], np.int64)[None],
                "vec": encode_last_token(self.llm, ids, self.device)[None]}


def _where(llm_id: str) -> str:
    """A local model directory by absolute path (workers do not share this process's working directory)."""
    return os.path.abspath(llm_id) if os.path.isdir(llm_id) else llm_id


def _encode_on_ray(pool: RayPool, llm: LoadedLLM, ids: list[list[np.ndarray]], positions: list[list[int]],
                   device) -> "Iterator[tuple[np.ndarray, np.ndarray]]":
    """Planned batches through an actor pool; yields each batch's (positions, vectors) as it returns."""
    import ray.data

    from .core.ray_setup import actor_cpus, connect

    connect(pool.address)
    cpus = actor_cpus(pool.num_workers, pool.cpus_per_worker)
    items = [{"pos": list(p), "ids": [t.tolist() for t in b]} for p, b in zip(positions, ids)]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * pool.num_workers))
    out = ds.map_batches(
        LLMWorker, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs=dict(llm_id=_where(llm.info.id), namespace=llm.info.namespace, device=str(device),
                                   layers=llm.info.extra.get("layers"),
                                   threads=max(1, int(round(cpus)))),
        compute=ray.data.ActorPoolStrategy(size=pool.num_workers), num_cpus=cpus,
        num_gpus=pool.gpus_per_worker or None)  # Ray Data restarts dead actors and retries their calls
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        for pos, vec in zip(batch["pos"], batch["vec"]):
            yield np.asarray(pos), np.asarray(vec)
