"""The two fp32 graphs, exported and checked against PyTorch on real windows, and their fp16 twins.

The forecaster is checked against the same module in eager PyTorch (normalised units); the LLM
against the unmodified Hugging Face forward, so the check covers the last-position shortcut in
the exported graph as well as the export. fp16 graphs carry their precision in the graph
(TensorRT strongly typed networks) and are measured on ORT CPU where its kernels allow.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from timecma.checkpoint import build_model
from timecma.core.accuracy import embedding_errors
from timecma.core.prompts import PromptRenderer
from timecma.core.scaling import Scaler
from timecma.core.tokens import encode_prompts, llm_feeds, pad_right, tokenizer_digest
from timecma.llm import LastTokenEncoder, LoadedLLM, encode_last_token
from timecma.runtime.backends.base import forecaster_feeds
from timecma.runtime.backends.ort import ort_session

from .onnx_export import ForecasterGraph, cached_llm_graph, convert_fp16, export_forecaster
from .options import FORECASTER_ONNX, LLM_ONNX, ExportError, errors
from .source import Source

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class LLMPart:
    """The exported LLM graph and what later steps reuse: the saved tokenizer, the parity prompts'
    token ids, the PyTorch embeddings they are judged against, and the manifest records."""

    tokenizer: Tokenizer  # loaded from the bundle's tokenizer.json
    renderer: PromptRenderer
    pad_id: int
    ids: list  # token ids of the parity windows' prompts, window-major
    n_windows: int
    torch_emb: np.ndarray  # [n_windows * N, d_llm] from the unmodified HF forward
    session: Any  # ORT session of the fp32 graph
    parity: dict  # inputs and ORT outputs kept for engine parity
    graph: dict  # the manifest's graph record
    files: dict = field(default_factory=dict)

    def run(self, sess, chunk: list) -> np.ndarray:
        """Embeddings of some prompts through an ORT session of one of the LLM graphs."""
        return sess.run(None, llm_feeds(chunk, self.pad_id))[0]

    def run_windows(self, sess) -> np.ndarray:
        """All parity prompts, one window's prompts per call (the serving batch)."""
        n = len(self.ids) // self.n_windows
        return np.concatenate([self.run(sess, self.ids[i * n:(i + 1) * n]) for i in range(self.n_windows)])

    @property
    def tokenizer_record(self) -> dict:
        return {"file": "tokenizer/tokenizer.json", "digest": tokenizer_digest(self.tokenizer)}

    @property
    def emb(self) -> np.ndarray:
        """[n_windows, N, d_llm] float32: the forecaster's prompt embeddings for the parity windows."""
        return self.torch_emb.reshape(self.n_windows, len(self.ids) // self.n_windows, -1).astype(np.float32)


@dataclass
class ForecasterPart:
    """The exported forecaster graph, the parity windows' inputs and its measured parity."""

    graph: ForecasterGraph
    export_s: float
    scaler: Scaler
    x: np.ndarray | None = None  # [W, seq_len, N] raw parity windows
    emb: np.ndarray | None = None  # [W, N, d_llm] or None without the LLM branch
    y_torch: np.ndarray | None = None
    y_ort: np.ndarray | None = None  # ORT fp32, one window per call
    session: Any = None  # ORT session of the graph
    parity: dict = field(default_factory=dict)

    def checked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The parity windows, PyTorch's forecasts for them and ONNX Runtime's: ``check_forecaster`` fills them in."""
        if self.x is None or self.y_torch is None or self.y_ort is None:
            raise RuntimeError("the forecaster part has not been through check_forecaster")
        return self.x, self.y_torch, self.y_ort

    def feeds(self, i: slice) -> dict:
        if self.x is None:
            raise RuntimeError("the forecaster part's parity windows come with check_forecaster")
        return forecaster_feeds(self.x[i], None if self.emb is None else self.emb[i])

    def units(self, y: np.ndarray) -> np.ndarray:
        """Forecasts in the units the model computes in: standard-normalised (the paper's scale), or for
        the log scaler in log space, where float32 rounding is not amplified by the exponential inverse."""
        return self.scaler.transform(y.astype(np.float64))

    @property
    def unit_name(self) -> str:
        return "log-normalized" if self.scaler.kind == "log" else "normalized"


def export_forecaster_graph(src: Source, tmp: str) -> ForecasterPart:
    """The forecaster (dataset scaling inside) as ``forecaster.onnx``."""
    scaler = Scaler.from_contract(src.data)
    graph = ForecasterGraph(build_model(src.cfg, src.state_dict), scaler).eval()
    log.info("exporting %s", FORECASTER_ONNX)
    t = time.time()
    export_forecaster(graph, os.path.join(tmp, FORECASTER_ONNX))
    return ForecasterPart(graph, time.time() - t, scaler)


def check_forecaster(fc: ForecasterPart, tmp: str, x: np.ndarray, emb: np.ndarray | None, tolerance: float) -> None:
    """ORT fp32 against PyTorch, one window per call and all in one batch; fills ``fc``."""
    fc.x, fc.emb = x, emb
    with torch.no_grad():
        fc.y_torch = fc.graph(torch.from_numpy(x), None if emb is None else torch.from_numpy(emb)).numpy()
    fc.session = ort_session(os.path.join(tmp, FORECASTER_ONNX))
    fc.y_ort = np.concatenate([fc.session.run(None, fc.feeds(slice(i, i + 1)))[0] for i in range(len(x))])
    one = errors(fc.units(fc.y_ort), fc.units(fc.y_torch))
    batched = errors(fc.units(fc.session.run(None, fc.feeds(slice(None)))[0]), fc.units(fc.y_torch))
    worst = max(one["max_abs"], batched["max_abs"])
    if worst > tolerance:
        raise ExportError(f"forecaster graph parity {worst:.2e} ({fc.unit_name} units) exceeds tolerance "
                          f"{tolerance:.0e}")
    log.info("parity: forecaster max abs %.2e (%s)", worst, fc.unit_name)
    fc.parity = {"batch_1": one, "batched": batched}


def export_llm_graph(src: Source, llm: LoadedLLM, tmp: str, series, starts) -> tuple:
    """Tokenizer and LLM last-token graph: the saved tokenizer, the renderer, the parity prompts' token ids
    (checked to equal the LLM tokenizer's) and the export time."""
    cfg, data = src.cfg, src.data
    # tokenizer: fast-tokenizer JSON the runtime loads with `tokenizers` alone
    tok_dir = os.path.join(tmp, "tokenizer")
    llm.tokenizer.save_pretrained(tok_dir)
    from tokenizers import Tokenizer

    saved_tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    log.info("exporting %s", LLM_ONNX)
    t = time.time()
    cached, _ = cached_llm_graph(llm)  # exported once per LLM: training's precompute may have done it already
    folder = os.path.dirname(cached)
    for name in os.listdir(folder):  # the graph (named LLM_ONNX there too) and any external data it references
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copyfile(os.path.join(folder, name), os.path.join(tmp, name))
    export_s = time.time() - t
    renderer = PromptRenderer.from_record(src.prompt, data.frequency)
    prompts = renderer.render_series(series.values, series.timestamps, starts, cfg.seq_len)
    ids = encode_prompts(saved_tok, prompts)
    if [list(a) for a in ids] != [list(a) for a in encode_prompts(llm.backend, prompts)]:
        raise ExportError("the saved tokenizer.json tokenizes differently from the LLM's tokenizer")
    return saved_tok, renderer, ids, export_s


def llm_graph(src: Source, llm: LoadedLLM, opts, tmp: str, series, starts) -> LLMPart:
    """Export the LLM graph and check it: per window, all prompts in one batch, and one prompt alone."""
    saved_tok, renderer, ids, export_s = export_llm_graph(src, llm, tmp, series, starts)
    n = src.cfg.num_nodes
    # Parity against the unmodified Hugging Face forward (what users run eagerly).
    plain = LoadedLLM(LastTokenEncoder(llm.encoder.model, last_position_only=False), llm.tokenizer, llm.info)
    torch_emb = np.concatenate([encode_last_token(plain, ids[i * n:(i + 1) * n]) for i in range(len(starts))])
    part = LLMPart(saved_tok, renderer, llm.info.pad_id, ids, len(starts), torch_emb,
                   ort_session(os.path.join(tmp, LLM_ONNX)), {}, {})
    ort_emb = part.run_windows(part.session)
    per_window = errors(ort_emb, torch_emb)
    # shapes other than the export example: all prompts in one batch, and single prompts
    all_in_one = errors(part.run(part.session, ids), encode_last_token(plain, ids))
    single = errors(part.run(part.session, ids[:1]), torch_emb[:1])
    worst = max(per_window["max_abs"], all_in_one["max_abs"], single["max_abs"])
    if worst > opts.tolerance:
        raise ExportError(f"LLM graph parity {worst:.2e} exceeds tolerance {opts.tolerance:.0e}")
    log.info("parity: LLM max abs %.2e", worst)
    a1, m1 = pad_right(ids[:n], llm.info.pad_id)
    part.parity = {"llm_input_ids": a1, "llm_attention_mask": m1, "llm_out": ort_emb[:n]}
    part.files = {"fp32": {"file": LLM_ONNX}}
    part.graph = {
        "inputs": {"input_ids": {"shape": ["B", "S"], "dtype": "int64"},
                   "attention_mask": {"shape": ["B", "S"], "dtype": "int64"}},
        "outputs": {"last_hidden": {"shape": ["B", src.cfg.d_llm], "dtype": "float32"}},
        "padding": "right", "last_block_last_position_only": llm.encoder.last_position_only,
        "parity_vs_torch": {"ort_cpu_fp32": {"per_window": per_window, "all_in_one_batch": all_in_one,
                                             "single_prompt": single}},
        "export_seconds": round(export_s, 1)}
    return part


def fp16_twin(tmp: str, file: str, measure: Callable[[object], tuple[float, dict]], gate: float,
              calibration: list[dict] | None = None) -> tuple[dict | None, dict]:
    """``file`` converted to fp16 (``convert_fp16``: weight matmuls in fp16, the rest fp32) and checked
    on ORT CPU before any engine is built from it: ``measure(session)`` gives the gate's figure and
    what to record. Returns (the ``files`` entry or None when refused, the check's record)."""
    f16 = file.replace(".onnx", ".fp16.onnx")
    conversion = convert_fp16(os.path.join(tmp, file), os.path.join(tmp, f16), calibration)
    try:
        figure, record = measure(ort_session(os.path.join(tmp, f16)))
    except Exception as exc:  # a graph that cannot be checked is not vouched for
        figure, record = float("inf"), {"not_measured": f"ONNX Runtime CPU cannot run it: {exc}"[:200]}
    record.update(conversion=conversion, gate=gate, gate_figure=figure, accepted=bool(figure <= gate))
    if record["accepted"]:
        return {"file": f16, "parity_vs_torch_ort_cpu": record}, record
    os.unlink(os.path.join(tmp, f16))
    log.warning("fp16 graph of %s refused: %.3g over its gate %.0e (%s); no fp16 engine is built from it", file,
                figure, gate, record.get("not_measured", "ORT CPU against PyTorch fp32"))
    return None, record


def forecaster_fp16(tmp: str, fc: ForecasterPart, gate: float) -> tuple[dict | None, dict]:
    """Judged by the forecast itself: the largest change in the model's units (``ForecasterPart.units``)."""
    def measure(sess):
        err = errors(fc.units(sess.run(None, fc.feeds(slice(None)))[0]), fc.units(fc.checked()[1]))
        return err["max_abs"], err

    return fp16_twin(tmp, FORECASTER_ONNX, measure, gate)


def llm_fp16(tmp: str, part: LLMPart, fc: ForecasterPart, gate: float) -> tuple[dict | None, dict]:
    """Judged on the parity windows' real prompts by the embedding each prompt gets (relative L2 error
    against PyTorch fp32, the worst prompt) and by the forecast made from those embeddings (the
    largest change in the model's units): the gate takes the larger. The first window's
    prompts, one at a time, calibrate which matmuls must stay fp32, so they are scored on the other
    windows (on all of them only when there is one window, and the record says so)."""
    n = len(part.ids) // part.n_windows
    calibration = [llm_feeds([ids], part.pad_id) for ids in part.ids[:n]]
    scored = slice(1, None) if part.n_windows > 1 else slice(None)
    rows = slice(n, None) if part.n_windows > 1 else slice(None)

    def measure(sess):
        emb = part.run_windows(sess)
        y = fc.session.run(None, forecaster_feeds(fc.checked()[0], emb.reshape(part.n_windows, n, -1)))[0]
        y32 = fc.session.run(None, fc.feeds(slice(None)))[0]
        change = float(np.abs(fc.units(y[scored]) - fc.units(y32[scored])).max())
        record = {**errors(emb[rows], part.torch_emb[rows]), **embedding_errors(emb[rows], part.torch_emb[rows]),
                  "forecast_max_abs_change_normalized": change,
                  "calibrated_on": "window 0's prompts",
                  "scored_on": f"windows 1-{part.n_windows - 1}" if part.n_windows > 1
                  else "window 0 (the calibration window: only one parity window)"}
        return max(record["prompt_rel_l2_max"], change), record

    return fp16_twin(tmp, LLM_ONNX, measure, gate, calibration)
