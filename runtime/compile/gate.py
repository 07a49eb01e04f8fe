"""The one gate reference every compiled variant is judged against (torch-free): a bundle's validation
windows (``parity/gate.npz``, written by export) and ONNX Runtime fp32's outputs on them.

TensorRT engines (``runtime.compile.tensorrt.EngineGate``) and OpenVINO variants
(``runtime.compile.openvino.build_openvino``) both load it from here; the decision they take from it is
``timecma.core.accuracy.judge_variant``.
"""

from __future__ import annotations

import os

import numpy as np

from timecma.core.accuracy import embedding_errors
from timecma.core.errors import BundleError
from timecma.core.manifest import Manifest
from timecma.core.timing import time_calls

from ..backends.base import forecaster_feeds
from ..backends.ort import ort_session

GATE_FILE = "parity/gate.npz"
REEXPORT = "re-export the bundle to get gate windows"


class GateReference:
    """The bundle's validation windows and ONNX Runtime fp32's outputs on them.

    ``windows`` None: every stored window (OpenVINO); a number: up to that many spread over the stored
    ones, fewer where N is large (their prompts kept to about ``prompts``, two windows at least). Only
    windows whose prompts fit ``max_seq`` tokens are kept (a TensorRT engine's profile).

    Attributes: ``x`` [W, seq_len, N] raw windows, ``truth`` [W, pred_len, N] normalised, ``mean``/``std``
    [N]; ``ids``/``mask`` [W*N, T] the prompts (None without an LLM graph or prompts), cut to the longest
    one; ``emb_ref`` [W, N, d] fp32 embeddings (None likewise); ``y_ref`` [W, pred_len, N] fp32 forecasts;
    ``mse_ref`` their MSE."""

    def __init__(self, bundle_dir: str, manifest: Manifest, threads: int | None = None, *,
                 max_seq: int | None = None, windows: int | None = None, prompts: int | None = None):
        path = os.path.join(bundle_dir, GATE_FILE)
        if not os.path.isfile(path):
            raise BundleError(f"{bundle_dir} has no {GATE_FILE} (exported by an older timecma): {REEXPORT} "
                              "and gate its lower precisions")
        self.n = n = manifest.model_config.num_nodes
        self.pad_id = manifest.llm.pad_id if manifest.llm else 0
        with np.load(path) as g:
            arrays = {k: g[k] for k in g.files}
        total = len(arrays["x"])
        usable = np.arange(total)
        has_llm = "llm" in manifest.graphs and "llm_input_ids" in arrays and "llm_attention_mask" in arrays
        if has_llm and max_seq:
            longest = arrays["llm_attention_mask"].sum(axis=1).reshape(total, n).max(axis=1)
            usable = usable[longest <= max_seq]
        if not len(usable):
            raise BundleError(f"every validation window has a prompt longer than the profile's {max_seq} tokens")
        if windows is not None:
            k = min(len(usable), windows, max(2, (prompts or n) // n) if has_llm else windows)
            usable = usable[np.unique(np.linspace(0, len(usable) - 1, k).round().astype(int))]
        self.windows = usable
        self._starts = arrays["starts"][usable] if "starts" in arrays else None
        self.span = manifest.model_config.seq_len + manifest.model_config.pred_len
        self.x = arrays["x"][usable]
        self.truth, self.mean, self.std = arrays["truth"][usable], arrays["mean"], arrays["std"]
        self.fc_ref = ort_session(os.path.join(bundle_dir, manifest.graphs["forecaster"].files["fp32"].file),
                                  threads=threads)
        self.ids: np.ndarray | None = None
        self.mask: np.ndarray | None = None
        self.emb_ref: np.ndarray | None = None
        if has_llm:
            rows = (usable[:, None] * n + np.arange(n)[None]).ravel()
            mask = arrays["llm_attention_mask"][rows]
            width = int(mask.sum(axis=1).max())
            self.ids, self.mask = arrays["llm_input_ids"][rows][:, :width], mask[:, :width]
            llm = ort_session(os.path.join(bundle_dir, manifest.graphs["llm"].files["fp32"].file), threads=threads)
            self.emb_ref = self.embed(lambda a, m: llm.run(None, {"input_ids": a, "attention_mask": m})[0])
        self.y_ref = self.forecast_fp32(self.emb_ref)
        self.mse_ref = self.mse(self.y_ref)

    def starts(self) -> np.ndarray:
        """Where each gate window starts in the validation rows (to keep calibration and scoring windows apart)."""
        if self._starts is None:
            raise BundleError(f"{GATE_FILE} records no window starts (exported by an older timecma): {REEXPORT}")
        return self._starts

    def prompts(self) -> tuple[np.ndarray, np.ndarray]:
        """The gate prompts' token ids and attention mask (the gate file of a bundle with an LLM graph has them)."""
        if self.ids is None or self.mask is None:
            raise BundleError(f"{GATE_FILE} has no LLM prompts (exported by an older timecma): {REEXPORT} "
                              "and gate the LLM graph")
        return self.ids, self.mask

    def embed(self, run_llm) -> np.ndarray:
        """[W, N, d] embeddings, one window's prompts per call (as serving sends a window's misses)."""
        n, (ids, mask) = self.n, self.prompts()
        return np.stack([np.asarray(run_llm(ids[i * n:(i + 1) * n], mask[i * n:(i + 1) * n]))
                         for i in range(len(self.x))]).astype(np.float32)

    def judge_llm(self, run, budget_s: float = 10) -> tuple[np.ndarray, dict, list[float]]:
        """An LLM graph's embeddings of every gate prompt [W, N, d], their errors against fp32, and the ms of
        one window's prompts (5 calls after a warm-up, within ``budget_s``)."""
        emb = self.embed(lambda a, m: run({"input_ids": a, "attention_mask": m}))
        ids, mask = self.prompts()
        assert self.emb_ref is not None, "the fp32 embeddings of the prompts, made with them in __init__"
        feeds = {"input_ids": ids[:self.n], "attention_mask": mask[:self.n]}
        ms, _ = time_calls(lambda k: run(feeds), 5, warmup=1, budget_s=budget_s)
        return emb, embedding_errors(emb, self.emb_ref), ms

    def forecast(self, run_fc, emb: np.ndarray | None) -> np.ndarray:
        """Forecasts [W, pred_len, N] of ``run_fc(x, prompt_emb)`` on every window, one window per call;
        ``emb``: the windows' embeddings, [W, N, d] or one row per prompt [W*N, d]."""
        d = None if emb is None else emb.reshape(len(self.x), self.n, -1)
        return np.concatenate([run_fc(self.x[i:i + 1], None if d is None else d[i:i + 1])
                               for i in range(len(self.x))])

    def forecast_fp32(self, emb: np.ndarray | None) -> np.ndarray:
        """The fp32 forecaster (ONNX Runtime) on every window, one window per call."""
        return self.forecast(lambda x, e: self.fc_ref.run(None, forecaster_feeds(x, e))[0], emb)

    def mse(self, y: np.ndarray, keep: np.ndarray | slice = slice(None)) -> float:
        """Forecast MSE (the paper's units) over the gate windows ``keep`` (``y`` covers them all)."""
        return float(np.mean(((y[keep] - self.mean) / self.std - self.truth[keep]) ** 2))
