"""The serving pipeline: raw window -> prompts -> tokens -> store lookup -> LLM on misses ->
store insert -> forecaster -> forecast in original units. Torch-free."""

from __future__ import annotations

import json
import logging
import os
import threading
from decimal import Decimal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from timecma import __version__
from timecma.core.conformal import Calibration, no_calibration, parse_levels
from timecma.core.errors import BundleError, InputError
from timecma.core.manifest import Manifest, read_manifest
from timecma.core.scaling import Scaler
from timecma.core.prompts import FREQUENCY_SECONDS, PromptRenderer
from timecma.core.bounded_store import BoundedStore
from timecma.core.store import EmbeddingStore, StoreWriteError
from timecma.core.timestamps import check_timestamps
from timecma.core.tokens import check_lengths, encode_prompts, pad_right, plan_llm_batches, tokenizer_digest

from ..backends.base import Backend
from ..backends.select import make_backend

if TYPE_CHECKING:
    from .backtest import BacktestMetrics

log = logging.getLogger(__name__)


@dataclass
class Stats:
    """Counters and per-stage seconds accumulated over requests."""

    requests: int = 0
    clamped: int = 0  # input values at or below the log scaler's floor (clamped inside the graph)
    hits: int = 0
    misses: int = 0
    window_hits: int = 0  # batch-1 requests served from a stored window record (prompt encoder skipped)
    llm_calls: int = 0
    store_write_failures: int = 0  # batches of new vectors the store could not take (served uncached)
    seconds: dict = field(default_factory=lambda: {"render": 0.0, "tokenize": 0.0, "store": 0.0, "llm": 0.0,
                                                   "forecaster": 0.0})


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _as_array(x, dtype, what: str) -> np.ndarray:
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"{what} cannot be read as {np.dtype(dtype)}: {exc}") from exc


def _numeric_column(col, name: str) -> np.ndarray:
    """A DataFrame column as float64: ints and floats, or objects that are all numbers (Decimal)."""
    kind = col.dtype.kind
    if kind in "iuf":
        return col.to_numpy(dtype=np.float64)
    if kind == "O":
        items = col.tolist()
        if all(isinstance(x, (int, float, Decimal)) and not isinstance(x, bool) for x in items):
            return np.array([float(x) for x in items], dtype=np.float64)
    raise InputError(f"variable column {name!r} has dtype {col.dtype}; numbers are needed")


def _time_column(col, name: str) -> np.ndarray:
    """Timestamps as naive datetime64[ns]; timezone-aware ones are taken in UTC (as serve-batch does)."""
    if getattr(col.dtype, "tz", None) is not None:
        col = col.dt.tz_convert("UTC").dt.tz_localize(None)
    try:
        return np.asarray(col.to_numpy(), dtype="datetime64[ns]")
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"time column {name!r} holds a value that is not a timestamp: {exc}") from exc


class Forecaster:
    """A loaded bundle: ``Forecaster.load(bundle, backend="auto", store=dir).predict(window)``.

    Thread-safe: requests from several threads are served one at a time under one lock,
    because what they share is not (a TensorRT execution context and its device buffers, the
    preallocated batch-1 arrays, the counters). For parallel throughput use processes
    (several may share one store) or batch windows with ``predict_many``."""

    def __init__(self, bundle_dir: str, manifest: Manifest, backend: Backend, store: EmbeddingStore | BoundedStore | None,
                 llm_batch: int = 64, llm_batch_tokens: int | None = None):
        self.bundle_dir, self.manifest, self.backend, self.store = bundle_dir, manifest, backend, store
        cfg, data = manifest.model_config, manifest.data
        self.seq_len, self.pred_len, self.n_vars = cfg.seq_len, cfg.pred_len, cfg.num_nodes
        self.d_llm = cfg.d_llm
        self.variables: list[str] = data.variables
        self.time_col: str = data.time_col
        self.frequency: str = data.frequency
        # the engines' profiles bound what may be asked of them (ONNX Runtime has no bounds)
        lim = getattr(backend, "limits", {}) or {}
        self.forecast_batch = lim.get("forecast_batch", 1 << 30)
        self.stats = Stats()
        self._lock = threading.Lock()
        self._x1 = np.empty((1, self.seq_len, self.n_vars), dtype=np.float32)  # batch-1 buffer, reused
        self.scaler = Scaler.from_contract(manifest.data)  # applied inside the graph; here to count clamps
        cal = manifest.info.get("calibration")
        self.calibration = Calibration.load(os.path.join(bundle_dir, cal["file"])) if cal else None
        self.uses_llm = manifest.llm is not None
        self._window_salt: bytes | None = None  # set below where single windows keep their encoded prompts
        if not self.uses_llm:  # timecma-no-llm, dlinear: no prompts, tokenizer or store
            self.renderer = self.tokenizer = None
            return
        llm, prompt, tok = manifest.llm, manifest.prompt, manifest.tokenizer
        if llm is None or prompt is None or tok is None:
            raise BundleError(f"{bundle_dir}: the manifest records an LLM without its prompt or tokenizer")
        self.renderer = PromptRenderer.from_record(prompt, self.frequency)
        self.tokenizer = Tokenizer.from_file(os.path.join(bundle_dir, tok["file"]))
        if tokenizer_digest(self.tokenizer) != tok["digest"]:
            raise BundleError(f"{bundle_dir}: tokenizer.json differs from the one recorded at export")
        self.pad_id = llm.pad_id
        self.max_positions = llm.max_positions
        self.llm_batch = min(llm_batch, lim.get("llm_batch", llm_batch))
        self.llm_batch_tokens = llm_batch_tokens  # padded tokens per LLM call (None: bounded by llm_batch alone)
        self.max_tokens = min(self.max_positions, lim.get("llm_seq", self.max_positions))
        self._token_limit = ("the LLM accepts at most {n} positions" if self.max_tokens == self.max_positions
                             else "the TensorRT engine's profile allows at most {n} tokens")
        self._emb1 = np.empty((1, self.n_vars, self.d_llm), dtype=np.float32)
        # batch-1 requests keep each window's encoded prompts in the store, where the backend runs the forecaster
        # split; the record's key fixes its content: the window, how prompts are rendered, what encodes them
        split = getattr(backend, "split", None)
        if store is not None and split:
            self._window_salt = "|".join((split, json.dumps(manifest.prompt, sort_keys=True), self.frequency,
                                          __version__)).encode()

    @classmethod
    def load(cls, bundle_dir: str, backend: str = "auto", store: str | None = None, store_max_gb: float | None = None,
             llm_batch_tokens: int | None = None, **backend_kwargs) -> "Forecaster":
        """``store_max_gb``: keep the store within this on disk (``core.bounded_store``: two generations, the
        older evicted when the newer is full), for endpoints that run for months; a bounded store belongs to
        one process, so each process takes a directory of its own under ``store`` (``proc-0``, ``proc-1``...)."""
        manifest = read_manifest(bundle_dir)
        be = make_backend(backend, bundle_dir, manifest, **backend_kwargs)
        st: EmbeddingStore | BoundedStore | None = None
        llm = manifest.llm
        if store and llm is None:
            log.info("%s has no LLM branch (%s): the store is not used", bundle_dir, manifest.model_config.model)
        elif store and llm is not None:
            # keyed by the precision the backend's LLM stage computes in: other precisions' vectors are never read
            try:
                if store_max_gb:  # one process owns a bounded store: this one's own directory under ``store``
                    st = BoundedStore.claim(store, llm.namespace, llm.d_llm, describe=f"LLM {llm.id}",
                                            precision=be.llm_precision, max_bytes=int(store_max_gb * (1 << 30)))
                else:
                    st = EmbeddingStore(store, llm.namespace, llm.d_llm, describe=f"LLM {llm.id}",
                                        precision=be.llm_precision)
            except StoreWriteError as exc:  # the store is a cache: forecasting goes on without it
                log.warning("%s; serving goes on uncached", exc)
        log.info("loaded bundle %s on %s%s", bundle_dir, be.name, f" with store {store}" if store else "")
        return cls(bundle_dir, manifest, be, st, llm_batch_tokens=llm_batch_tokens)

    # -- request path ------------------------------------------------------------------
    def predict(self, window, timestamps=None, levels=None):
        """One window -> [pred_len, N] forecast in original units; with ``levels`` (e.g. ``[80, 95]``) a dict
        ``{"forecast": y, "lo-80": ..., "hi-80": ..., ...}`` of such arrays (split-conformal intervals).

        ``window``: a DataFrame with the time column and the model's variables (any column
        order; matched by name), or a [seq_len, N] array with ``timestamps`` [seq_len].
        """
        levels = parse_levels(levels)
        self.check_levels(levels)
        values, ts = self._window_arrays(window, timestamps)
        y = self.predict_many(values[None], ts[None])
        if not levels:
            return y[0]
        out = {"forecast": y[0]}
        for lv, (lo, hi) in self.intervals(values[None], y, levels).items():
            out[f"lo-{lv}"], out[f"hi-{lv}"] = lo[0], hi[0]
        return out

    def check_levels(self, levels: list[int]) -> None:
        """Interval levels need the bundle's conformal calibration."""
        if levels and self.calibration is None:
            raise no_calibration(self.bundle_dir)

    def intervals(self, values: np.ndarray, y: np.ndarray, levels: list[int]) -> dict:
        """level -> (lo, hi) [W, pred_len, N] around forecasts ``y`` of windows ``values`` [W, seq_len, N]."""
        self.check_levels(levels)
        if not levels or self.calibration is None:
            return {}
        return {lv: (lo.astype(np.float32), hi.astype(np.float32))
                for lv, (lo, hi) in self.calibration.intervals(values, y, levels).items()}

    def backtest(self, frame, stride: int = 24, levels=None, series_col: str | None = None):
        """Rolling-origin backtest of a DataFrame (time column + variables, optional series column): forecasts
        from a window every ``stride`` rows, scored against the actuals that follow each cutoff.

        Returns ``(forecasts, metrics)``: a DataFrame (series, ``cutoff``, ``step``, time, variables, interval
        columns) and the metrics dict ``timecma-serve-batch --metrics`` writes (model and naive baselines).
        The work is ``frame_backtest.backtest_frame``'s, which drives the batch server: this module never
        imports the batch server (which builds on it)."""
        from .frame_backtest import backtest_frame

        return backtest_frame(self, frame, stride=stride, levels=levels, series_col=series_col)

    def backtest_metrics(self, levels: list[int]) -> "BacktestMetrics":
        """An empty accumulator for this bundle's variables, horizon and training scale."""
        from .backtest import BacktestMetrics

        d = self.manifest.data
        std = d.info.get("raw_std") or (d.scaler_std if d.scaler_kind == "standard" else None)
        if std is None:
            raise BundleError(f"{self.bundle_dir} does not record the training split's scale (log scaler, older "
                              "export): re-export it to score backtests")
        return BacktestMetrics(self.variables, self.seq_len, self.pred_len, self.frequency, std, levels)

    def predict_many(self, values: np.ndarray, timestamps: np.ndarray, window_records: bool = False) -> np.ndarray:
        """Windows [W, seq_len, N] raw + timestamps [W, seq_len] -> [W, pred_len, N].

        ``window_records``: where the backend runs the forecaster split and a store is open, a window served
        before as a single window is answered from its stored record even inside a batch (the endpoint's
        dynamic batches: a repeated window costs the head alone); the others go through the whole graph
        together. Off by default, so a batch is one path (batch scoring compares runs bit for bit)."""
        with self._lock:
            return self._predict_many(values, timestamps, window_records)

    def predict_if_stored(self, values: np.ndarray, timestamps: np.ndarray) -> np.ndarray | None:
        """One window [seq_len, N] -> [pred_len, N] if its encoded prompts are stored (a window served before:
        the head alone, well under a millisecond) and no other thread is forecasting now; else None at once,
        nothing done. For a caller that must not block long (an event loop serving a lone request)."""
        store = self.store
        if self._window_salt is None or store is None or not self._lock.acquire(blocking=False):
            return None
        try:
            if values.shape != (self.seq_len, self.n_vars) or timestamps.shape != (self.seq_len,):
                return None
            t = time.perf_counter()
            key = self._window_record_key(values, timestamps)
            enc = store.get_window(key, (1, self.n_vars, self.d_llm))
            if enc is None:
                return None
            self.stats.seconds["store"] += time.perf_counter() - t
            return self._predict_many(values[None], timestamps[None], found=(key, enc))[0]
        finally:
            self._lock.release()

    def _predict_many(self, values: np.ndarray, timestamps: np.ndarray, window_records: bool = False,
                      found=None) -> np.ndarray:
        values = _as_array(values, np.float64, "window values")
        timestamps = _as_array(timestamps, "datetime64[ns]", "timestamps")
        if values.ndim != 3 or values.shape[1:] != (self.seq_len, self.n_vars):
            raise InputError(f"windows must be [W, {self.seq_len}, {self.n_vars}], got {list(values.shape)}")
        w = values.shape[0]
        if timestamps.shape != (w, self.seq_len):
            raise InputError(f"timestamps must be [{w}, {self.seq_len}], got {list(timestamps.shape)}")
        if not np.isfinite(values).all():
            i, r, c = (int(a[0]) for a in np.nonzero(~np.isfinite(values)))
            raise InputError(f"window {i}: non-finite value in column {self.variables[c]!r} at row {r}")
        if w and np.abs(values).max() > FLOAT32_MAX:
            i, r, c = (int(a[0]) for a in np.nonzero(np.abs(values) > FLOAT32_MAX))
            raise InputError(f"window {i}: value {values[i, r, c]:.3g} in column {self.variables[c]!r} at row {r} "
                             "is beyond float32, the model's precision")
        for i in range(w):
            check_timestamps(timestamps[i], self.frequency, f"window {i}")
        clamped = self.scaler.below_floor(values)
        if clamped.any():
            self.stats.clamped += int(clamped.sum())
            log.warning("%d input value(s) at or below the log scaler's floor (a new all-time low) were clamped "
                        "(windows %s)", int(clamped.sum()), np.flatnonzero(clamped)[:10].tolist())
        if w == 1 and self._window_salt is not None:
            y = self._predict_window(values[0], timestamps[0], found)
        elif w > 1 and window_records and self._window_salt is not None:
            y = self._predict_records_first(values, timestamps)
        else:
            y = self._predict_whole(values, timestamps)
        self.stats.requests += w
        y = np.asarray(y, dtype=np.float32)
        if not np.isfinite(y).all():
            i = int(np.nonzero(~np.isfinite(y))[0][0])
            raise InputError(f"window {i}: the forecast is not finite; its values are outside the range the model "
                             "can represent (magnitudes far beyond the training data)")
        return y

    def _predict_window(self, values: np.ndarray, timestamps: np.ndarray, found=None) -> np.ndarray:
        """One window through the split forecaster: its encoded prompts from the store (a window served
        before: no rendering, no embeddings, no prompt encoder), else computed and stored. ``found``: the
        (key, record) a caller has already read."""
        s, store, renderer = self.stats.seconds, self.store, self.renderer
        assert store is not None and renderer is not None  # a window salt is set only with both
        t = time.perf_counter()
        if found is None:
            key = self._window_record_key(values, timestamps)
            enc = store.get_window(key, (1, self.n_vars, self.d_llm))
        else:
            key, enc = found
        s["store"] += time.perf_counter() - t
        if enc is not None:
            self.stats.window_hits += 1
            self.stats.hits += self.n_vars
        else:
            t = time.perf_counter()
            prompts = renderer.render_series(values, timestamps, [0], self.seq_len)
            s["render"] += time.perf_counter() - t
            self._emb1[0] = self._embeddings(prompts)
            t = time.perf_counter()
            enc = self.backend.run_prompt_encoder(self._emb1)
            s["forecaster"] += time.perf_counter() - t
            self._store_write(store.put_window, key, enc)
        t = time.perf_counter()
        self._x1[0] = values
        y = self.backend.run_head(self._x1, enc)
        s["forecaster"] += time.perf_counter() - t
        return y

    def _window_record_key(self, values: np.ndarray, timestamps: np.ndarray) -> bytes:
        assert self.store is not None and self._window_salt is not None
        return self.store.window_key(self._window_salt, np.ascontiguousarray(values, np.float64).tobytes(),
                                     timestamps.astype("datetime64[ns]").view(np.int64).tobytes())

    def _predict_records_first(self, values: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
        """Windows with a stored record through the head alone (one batch-1 call each), the rest together
        through the whole graph."""
        s, w, store = self.stats.seconds, values.shape[0], self.store
        assert store is not None
        y = np.empty((w, self.pred_len, self.n_vars), np.float32)
        rest = []
        for i in range(w):
            t = time.perf_counter()
            enc = store.get_window(self._window_record_key(values[i], timestamps[i]),
                                        (1, self.n_vars, self.d_llm))
            s["store"] += time.perf_counter() - t
            if enc is None:
                rest.append(i)
                continue
            self.stats.window_hits += 1
            self.stats.hits += self.n_vars
            t = time.perf_counter()
            self._x1[0] = values[i]
            y[i] = self.backend.run_head(self._x1, enc)[0]
            s["forecaster"] += time.perf_counter() - t
        if rest:
            y[rest] = self._predict_whole(values[rest], timestamps[rest])
        return y

    def _predict_whole(self, values: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
        """Windows through the whole forecaster graph: embeddings (store, LLM on misses), then the forecaster."""
        s, w = self.stats.seconds, values.shape[0]
        emb = None
        if self.uses_llm:
            t = time.perf_counter()
            assert self.renderer is not None  # uses_llm
            prompts: list[str] = []
            for i in range(w):
                prompts += self.renderer.render_series(values[i], timestamps[i], [0], self.seq_len)
            s["render"] += time.perf_counter() - t
            emb = self._embeddings(prompts).reshape(w, self.n_vars, self.d_llm)
        t3 = time.perf_counter()
        if w == 1:
            self._x1[0] = values[0]
            if emb is not None:
                self._emb1[0] = emb[0]
            y = self.backend.run_forecaster(self._x1, self._emb1 if emb is not None else None)
        else:
            x, b = values.astype(np.float32), self.forecast_batch
            y = np.concatenate([self.backend.run_forecaster(x[i:i + b], None if emb is None else emb[i:i + b])
                                for i in range(0, w, b)])
        s["forecaster"] += time.perf_counter() - t3
        return y

    def _embeddings(self, prompts: list[str]) -> np.ndarray:
        """[P, d_llm] for P prompts: text index, then token-id keys, then the LLM on misses.

        Tokenization runs only for prompts the text index does not know, so a store hit
        costs a hash and a lookup per prompt.
        """
        s = self.stats.seconds
        t = time.perf_counter()
        if self.store is not None:
            emb, found = self.store.get_many_by_text(prompts)
        else:
            emb, found = np.zeros((len(prompts), self.d_llm), np.float32), np.zeros(len(prompts), bool)
        s["store"] += time.perf_counter() - t
        need = np.flatnonzero(~found)
        if len(need) == 0:
            self.stats.hits += len(prompts)
            return emb
        t = time.perf_counter()
        texts = [prompts[i] for i in need]
        assert self.tokenizer is not None  # uses_llm
        ids = encode_prompts(self.tokenizer, texts)
        check_lengths(ids, self.max_tokens, lambda k: f"window {need[k] // self.n_vars}, variable "
                                                      f"{self.variables[need[k] % self.n_vars]!r}", self._token_limit)
        s["tokenize"] += time.perf_counter() - t
        sub = emb[need]
        keys = None
        if self.store is not None:
            t = time.perf_counter()
            keys = self.store.keys(ids)
            sub, got = self.store.get_many(keys, out=sub)
            s["store"] += time.perf_counter() - t
        else:
            got = np.zeros(len(need), bool)
        missing = np.flatnonzero(~got)
        self.stats.hits += len(prompts) - len(missing)
        self.stats.misses += len(missing)
        if len(missing):
            t = time.perf_counter()
            for chunk in plan_llm_batches([len(ids[i]) for i in missing], self.llm_batch,
                                          max_tokens=self.llm_batch_tokens):
                rows = missing[chunk]
                a, m = pad_right([ids[i] for i in rows], self.pad_id)
                sub[rows] = self.backend.run_llm(a, m)
                self.stats.llm_calls += 1
            s["llm"] += time.perf_counter() - t
        emb[need] = sub
        if self.store is not None:  # new vectors, and text entries for keys found by their ids
            self._store_write(self.store.put_many, keys, sub, texts)
        return emb

    def _store_write(self, write, *args) -> None:
        """A store write, timed as the store stage; a failed one is counted and warned of once: the store is a
        cache, forecasting goes on without it."""
        t = time.perf_counter()
        try:
            write(*args)
        except StoreWriteError as exc:
            if not self.stats.store_write_failures:
                log.warning("%s; serving goes on uncached (counted in stats.store_write_failures)", exc)
            self.stats.store_write_failures += 1
        self.stats.seconds["store"] += time.perf_counter() - t

    def _window_arrays(self, window, timestamps) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(window, "columns"):  # a DataFrame (pandas is optional on deployment boxes)
            cols = list(window.columns)
            if self.time_col not in cols:
                raise InputError(f"window has no time column {self.time_col!r}")
            missing = [v for v in self.variables if v not in cols]
            if missing:
                raise InputError(f"window lacks variable column(s) {missing}")
            extra = [c for c in cols if c not in self.variables and c != self.time_col]
            if extra:
                raise InputError(f"window has unexpected column(s) {extra}; the model's variables are {self.variables}")
            values = np.stack([_numeric_column(window[v], v) for v in self.variables], axis=1) \
                if len(window) else np.empty((0, self.n_vars))
            ts = _time_column(window[self.time_col], self.time_col)
        else:
            if timestamps is None:
                raise InputError("an array window needs its timestamps")
            values = _as_array(window, np.float64, "window values")
            ts = _as_array(timestamps, "datetime64[ns]", "timestamps")
        if values.shape != (self.seq_len, self.n_vars):
            raise InputError(f"window must be [{self.seq_len}, {self.n_vars}] (seq_len x variables), got {list(values.shape)}")
        if ts.shape != (self.seq_len,):
            raise InputError(f"expected {self.seq_len} timestamps, got {ts.shape[0]}")
        return values, ts

    def forecast_timestamps(self, end: np.datetime64) -> np.ndarray:
        """Timestamps of the pred_len forecast steps after a window ending at ``end``."""
        steps = np.arange(1, self.pred_len + 1)
        end_ns = np.asarray(end, dtype="datetime64[ns]")
        if self.frequency == "monthly":
            month = end_ns.astype("datetime64[M]")
            offset = end_ns - month.astype("datetime64[ns]")
            return (month + steps).astype("datetime64[ns]") + offset
        return end_ns + steps * np.timedelta64(FREQUENCY_SECONDS[self.frequency], "s")

    def close(self) -> None:
        """Close the store and free the backend (device memory for TensorRT), under the lock every forecast
        holds: a forecast still running on another thread finishes first."""
        with self._lock:
            if self.store is not None:
                self.store.close()
            self.backend.close()

    def __enter__(self) -> "Forecaster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
