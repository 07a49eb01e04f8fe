"""The prompt step: render every window's prompts and either embed them once into the store (the paper's
frozen LLM) or keep their token ids for joint training, which embeds them every step."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.config import MODELS, TrainConfig
from ..core.errors import InputError
from ..core.prompts import PromptRenderer
from ..core.ray_setup import RayPool
from ..core.store import EmbeddingStore, precision_tag
from ..encoders import GATE_PROMPTS, parse_choice, prompt_encoder
from ..joint import TextCorpus, load_causal_lm
from ..llm import load_llm
from ..precompute import build_prompt_set, precompute
from .batches import SplitData
from .inputs import RunData

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    """What the prompt step leaves for training: each split's windows (with prompt keys or token ids), the
    store the embeddings are read from (None: no LLM, or joint training), and the LLM's identity."""

    splits: dict[str, SplitData]
    store: EmbeddingStore | None = None
    llm_info: dict | None = None
    d_llm: int = 0
    pad_id: int = 0
    computed: int = 0
    seconds: float = 0.0
    joint: dict[str, Any] = field(default_factory=dict)  # lm, tokenizer, corpus, base digest (joint training)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def embed_prompts(data: RunData, model_name: str, llm_id: str, llm_layers: int | None, cfg: TrainConfig,
                  store_dir: str, store_dtype: str, device: torch.device, ray: RayPool | None) -> Embedded:
    """The prompt step for ``model_name``: nothing without an LLM branch, token ids for joint training, the
    store filled once otherwise."""
    t0 = time.time()
    if cfg.joint != "none" and not MODELS[model_name]:
        raise InputError(f"--joint trains the LLM with the forecaster; --model {model_name} has no LLM")
    if cfg.joint != "none":
        out = _joint_prompts(data, llm_id, llm_layers, cfg, device)
    elif MODELS[model_name]:
        out = _frozen_embeddings(data, llm_id, llm_layers, cfg, store_dir, store_dtype, device, ray)
    else:
        out = Embedded({name: SplitData(w.starts, None) for name, w in data.windows.items()})
    out.seconds = time.time() - t0
    return out


def _joint_prompts(data: RunData, llm_id: str, llm_layers: int | None, cfg: TrainConfig,
                   device: torch.device) -> Embedded:
    """No store: the embeddings change every step; the LLM trains with its LM head (timecma.joint)."""
    renderer = PromptRenderer.from_record(data.prompt_record, data.series.frequency)
    llm = load_llm(llm_id, device, layers=llm_layers)  # tokenizer, limits and identity of the starting point
    sets = {name: build_prompt_set(data.series, w, renderer, llm, None) for name, w in data.windows.items()}
    lm, tokenizer = load_causal_lm(llm_id, cfg.joint, cfg.llm_init, llm_layers, cfg.lora_rank)
    corpus = (TextCorpus(cfg.joint_text, tokenizer, max(len(t) for t in sets["train"].token_ids),
                         llm.info.pad_id, cfg.seed) if cfg.joint_text else None)
    return Embedded({name: SplitData(w.starts, sets[name]) for name, w in data.windows.items()},
                    d_llm=llm.info.d_llm, pad_id=llm.info.pad_id,
                    joint={"lm": lm, "tokenizer": tokenizer, "corpus": corpus,
                           "base_digest": llm.info.weights_digest})


def _frozen_embeddings(data: RunData, llm_id: str, llm_layers: int | None, cfg: TrainConfig, store_dir: str,
                       store_dtype: str, device: torch.device, ray: RayPool | None) -> Embedded:
    """Every split's prompts embedded once into the store (one pass; a Ray job with ``ray``)."""
    renderer = PromptRenderer.from_record(data.prompt_record, data.series.frequency)
    llm = load_llm(llm_id, device, layers=llm_layers)
    engine = parse_choice(cfg.precompute_backend)  # `auto` resolved once, here
    store = EmbeddingStore(store_dir, llm.info.namespace, llm.info.d_llm, store_dtype, describe=f"LLM {llm_id}",
                           precision=precision_tag(*engine))
    try:
        sets = {name: build_prompt_set(data.series, w, renderer, llm, store) for name, w in data.windows.items()}
        all_ids = [t for ps in sets.values() for t in ps.token_ids]
        keys = [k for ps in sets.values() for k in ps.keys]
        encoder = None
        # the precision the store's vectors come from, in the checkpoint and bundle (vectors are keyed by it)
        llm.info.extra["precompute"] = {"backend": engine[0], "precision": store.precision}
        if engine != ("torch", "fp32") and store.missing(keys):  # eager fp32 is the gate's reference: no gate
            # the engine is chosen on validation prompts: the test split is the final evaluation's alone
            val = sets["val"].token_ids
            spread = np.linspace(0, len(val) - 1, min(GATE_PROMPTS, len(val))).round().astype(int)
            encoder = prompt_encoder(llm, cfg.precompute_backend, [val[i] for i in spread])
            llm.info.extra["precompute"] = encoder.record
        t_pre = time.time()
        computed = precompute(store, llm, all_ids, keys, cfg.llm_batch_size, device, desc="prompt embeddings",
                              prompts=[p for ps in sets.values() for p in ps.prompts], ray=ray, encoder=encoder)
    except BaseException:
        store.close()
        raise
    if computed:
        sec = time.time() - t_pre
        log.info("precompute: %d prompts in %.1fs (%.2f prompts/s) on %s", computed, sec, computed / sec,
                 encoder.backend if encoder else "eager PyTorch")
    log.info("embeddings ready: %d computed, store holds %d", computed, len(store))
    return Embedded({name: SplitData(w.starts, sets[name]) for name, w in data.windows.items()}, store,
                    llm.info.to_dict(), llm.info.d_llm, computed=computed)

