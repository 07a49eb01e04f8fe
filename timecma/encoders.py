"""The engines training's precompute can embed prompts with (``timecma-train --precompute-backend``).

``torch`` is eager PyTorch fp32 (the default, as before); ``torch:bf16`` the same model cast to
bf16; ``ort-cpu`` and ``openvino[:bf16|:int8]`` run the LLM's exported last-token graph on the
engines serving uses (exported once per LLM by ``cached_llm_graph``, under the store namespace in
the user cache dir, where export finds it too). Every engine but eager fp32 is gated before it
fills a store: its worst prompt's embedding error on a sample of the run's own prompts against
eager fp32 must stay inside the embedding gate, else the run stops naming the figure. The store
keys every vector by the precision that produced it (``core.store.precision_tag``), so serving at
the same precision is a store hit and vectors of different precisions never mix.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .core.accuracy import EMBEDDING_GATE, embedding_errors
from .core.config import PRECOMPUTE_BACKENDS
from .core.errors import BackendUnavailable, InputError
from .core.store import precision_tag
from .core.tokens import llm_feeds
from .llm import LoadedLLM, encode_last_token

log = logging.getLogger(__name__)

GATE_PROMPTS = 8  # prompts of the run (spread over it) that judge an engine against eager fp32


def parse_choice(choice: str) -> tuple[str, str]:
    """``openvino:bf16`` -> ("openvino", "bf16"); ``auto`` -> the fastest fp32 graph engine installed here
    (fp32 keeps the store shareable by every fp32 serving backend; reduced precisions are asked for by name)."""
    if choice not in PRECOMPUTE_BACKENDS:
        raise InputError(f"unknown precompute backend {choice!r}; choose from {', '.join(PRECOMPUTE_BACKENDS)}")
    if choice == "auto":
        import importlib.util

        if importlib.util.find_spec("openvino") is not None:
            return "openvino", "f32"
        if importlib.util.find_spec("onnxruntime") is not None:
            return "ort-cpu", "fp32"
        return "torch", "fp32"
    kind, _, prec = choice.partition(":")
    return kind, prec or ("f32" if kind == "openvino" else "fp32")


@dataclass
class PromptEncoder:
    """Token ids of some prompts -> their [B, d_llm] float32 embeddings, on one engine and precision."""

    backend: str
    precision: str  # the store's precision tag
    encode: Callable[[list[np.ndarray]], np.ndarray]
    record: dict  # what the checkpoint keeps: engine, precision, gate figure, graph export seconds

    def __call__(self, token_ids: list[np.ndarray]) -> np.ndarray:
        return self.encode(token_ids)


def _graph_runner(llm: LoadedLLM, kind: str, prec: str) -> tuple[Callable[[list[np.ndarray]], np.ndarray], float]:
    """The exported LLM graph on ONNX Runtime or OpenVINO; and the seconds its export took (0 when cached)."""
    try:
        from timecma.export.onnx_export import cached_llm_graph  # onnx and the exporter: the export extra

        path, export_s = cached_llm_graph(llm)
        if kind == "ort-cpu":
            from timecma.runtime.backends.ort import ort_session

            sess = ort_session(path)
            run = lambda feeds: sess.run(None, feeds)[0]  # noqa: E731
        else:
            from timecma.runtime.backends.openvino import graph_runner

            if prec == "int8":
                path = cached_int8_ir(path)
            run = graph_runner(path, prec)
    except ImportError as exc:
        extra = "openvino" if kind == "openvino" else "export"
        raise BackendUnavailable(f"precompute backend {kind} is not installed: pip install 'timecma[{extra}]' "
                                 f"({exc})") from exc
    return (lambda ids: run(llm_feeds(ids, llm.info.pad_id))), export_s


INT8_DIR = "openvino-int8"  # beside the cached LLM graph: the int8 IR, a folder that appears whole or not at all
INT8_TMP = ".openvino-int8-"  # its temporaries, named with the writer's PID (core.leftovers)


INT8_FILES = ("llm_last_token.int8.xml", "llm_last_token.int8.bin")  # what compress_int8 writes into it
INT8_CACHE = f"timecma's int8 graph cache (a folder holding only {' and '.join(INT8_FILES)})"


def _int8_complete(final: str) -> bool:
    return all(os.path.isfile(os.path.join(final, n)) for n in INT8_FILES)


def _is_int8_cache(path: str) -> bool:
    """A folder holding nothing but (some of) the int8 IR's files: this cache, whole or not."""
    return os.path.isdir(path) and not os.path.islink(path) and set(os.listdir(path)) <= set(INT8_FILES)


def cached_int8_ir(graph: str) -> str:
    """The int8 OpenVINO IR (.xml + .bin) of the cached LLM graph ``graph``, compressed once. It is written to
    a temporary folder beside it and renamed into place complete, so a folder in place is always whole (a
    killed writer leaves only its temporary, removed by the next call); concurrent writers keep the first.
    A folder in place without both files (damaged since) is rebuilt and replaced when it holds nothing but
    this cache's files; anything else there is refused (InputError), untouched."""
    from timecma.core.files import check_replaceable, publish_dir, replace_dir
    from timecma.core.leftovers import remove_dead_temporaries
    from timecma.runtime.compile.openvino import compress_int8

    folder = os.path.dirname(graph)
    final = os.path.join(folder, INT8_DIR)
    ir = os.path.join(final, INT8_FILES[0])
    remove_dead_temporaries(folder, INT8_TMP, "an unfinished int8 graph")
    if _int8_complete(final):
        return ir
    check_replaceable(final, _is_int8_cache, INT8_CACHE)  # before compressing
    tmp = tempfile.mkdtemp(prefix=f"{INT8_TMP}{os.getpid()}-", dir=folder)
    try:
        compress_int8(graph, os.path.join(tmp, os.path.basename(ir)))
        if not os.path.lexists(final):
            publish_dir(tmp, final)  # another writer's, published meanwhile, is kept
        elif not _int8_complete(final):
            log.warning("%s lacks some of %s: replacing it with a rebuilt one", final, ", ".join(INT8_FILES))
            replace_dir(tmp, final, _is_int8_cache, INT8_CACHE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ir


def prompt_encoder(llm: LoadedLLM, choice: str, sample: list[np.ndarray], gate: float = EMBEDDING_GATE) -> PromptEncoder:
    """The engine ``choice`` ready to embed, gated on ``sample`` prompts (one at a time: no padding in the way)."""
    kind, prec = parse_choice(choice)
    export_s = 0.0
    if kind == "torch":
        if prec == "fp32":
            encode = lambda ids: encode_last_token(llm, ids)  # noqa: E731
        else:  # a bf16 copy: the fp32 model stays the gate's reference
            low = LoadedLLM(copy.deepcopy(llm.encoder).to(getattr(torch, {"bf16": "bfloat16"}.get(prec, prec))),
                            llm.tokenizer, llm.info)
            encode = lambda ids: encode_last_token(low, ids)  # noqa: E731
    else:
        encode, export_s = _graph_runner(llm, kind, prec)
    enc = PromptEncoder(kind, precision_tag(kind, prec), encode, {})
    err = embedding_errors(np.concatenate([enc([t]) for t in sample]), encode_last_token(llm, sample))
    enc.record = {"backend": kind, "precision": enc.precision, "compute": prec, "graph_export_seconds":
                  round(export_s, 1), "embedding": {**err, "gate": gate}}
    verdict = f"worst prompt's embedding error {err['prompt_rel_l2_max']:.2e} on {err['prompts']} prompts"
    if err["prompt_rel_l2_max"] >= gate:
        raise InputError(f"precompute backend {choice} fails the embedding gate: {verdict} against eager fp32 "
                         f"(gate {gate:.0%}); choose another --precompute-backend (fp32: torch, ort-cpu, openvino)")
    log.info("precompute on %s %s: %s, accepted", kind, prec, verdict)
    return enc
