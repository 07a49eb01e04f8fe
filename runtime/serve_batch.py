"""`timecma-serve-batch input.parquet`: forecasts for every series of a parquet file (DESIGN §10).

The input is streamed record batch by record batch, so a file larger than memory works: per
series only the last seq_len rows are kept. Windows are forecast in small batches (LLM only
on store misses) and written to a temporary parquet file next to the output, renamed into
place only when the whole input was valid and served. Torch-free.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from timecma.core.errors import EXIT_CODES_HELP, BackendUnavailable, BundleError, InputError, fail
from timecma.core.leftovers import remove_dead_temporaries

from .backends import BACKENDS
from .pipeline import Forecaster, timestamp_problem

log = logging.getLogger(__name__)

READ_ROWS = 65536


@dataclass
class _SeriesState:
    """The tail of one series: the rows a later window may still need."""

    values: np.ndarray  # [<= seq_len, N] float64
    ts: np.ndarray  # [<= seq_len] datetime64[ns]
    rows: int = 0  # rows seen so far in this series


@dataclass
class ServeSummary:
    series: int = 0
    windows: int = 0
    rows_written: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _label(series_col: str | None, sid) -> str:
    return f"series {sid!r}" if series_col else "input"


CLAMPED_COL = "clamped_inputs"


def temp_prefix(out: str) -> str:
    """Hidden temporary beside the output: .NAME.tmp-PID (the PID tells dead ones from live ones)."""
    return f".{os.path.basename(os.path.abspath(out))}.tmp-"


class _Writer:
    """Appends forecast rows to a temporary parquet file; ``commit`` renames it into place."""

    def __init__(self, out: str, schema: pa.Schema):
        self.out = out
        d, name = os.path.split(os.path.abspath(out))
        self.tmp = os.path.join(d, f"{temp_prefix(out)}{os.getpid()}")
        self.schema = schema
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.writer.write_table(table)

    def commit(self) -> None:
        if self.writer is None:  # nothing to write still yields a valid, empty file
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.writer.close()
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class BatchServer:
    """Streams an input parquet file through a Forecaster into an output parquet file."""

    def __init__(self, forecaster: Forecaster, series_col: str | None = None, mode: str = "last", stride: int = 24,
                 batch_windows: int = 32):
        if mode not in ("last", "rolling"):
            raise ValueError(f"mode must be 'last' or 'rolling', got {mode!r}")
        if stride < 1:
            raise ValueError("stride must be at least 1")
        self.f, self.series_col, self.mode, self.stride = forecaster, series_col, mode, stride
        self.batch_windows = batch_windows
        self.states: dict = {}
        self.pending: list[tuple] = []  # (series id, values [L,N], ts [L])

    # -- input checks -------------------------------------------------------------------
    def _check_schema(self, schema: pa.Schema) -> None:
        f = self.f
        names = schema.names
        if f.time_col not in names:
            raise InputError(f"input has no time column {f.time_col!r} (columns: {names})")
        if self.series_col and self.series_col not in names:
            raise InputError(f"input has no series column {self.series_col!r} (columns: {names})")
        missing = [v for v in f.variables if v not in names]
        if missing:
            raise InputError(f"input lacks variable column(s) {missing}; the model needs {f.variables}")
        extra = [c for c in names if c not in f.variables and c not in (f.time_col, self.series_col)]
        if extra:
            hint = " (pass --series-col for a series id column)" if not self.series_col else ""
            raise InputError(f"input has unexpected column(s) {extra}; the model's variables are {f.variables}{hint}")
        for v in f.variables:
            t = schema.field(v).type
            if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_decimal(t)):
                raise InputError(f"variable column {v!r} has type {t}; numbers are needed")
        t = schema.field(f.time_col).type
        if not (pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_string(t)
                or pa.types.is_large_string(t)):
            raise InputError(f"time column {f.time_col!r} has type {t}; timestamps or ISO strings are needed")

    def _arrays(self, batch: pa.RecordBatch, first_row: int):
        f = self.f
        col = batch.column(batch.schema.get_field_index(f.time_col))
        if col.null_count:
            i = first_row + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"time column {f.time_col!r} is empty at row {i}")
        try:
            if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
                ts = col.cast(pa.timestamp("ns")).to_numpy(zero_copy_only=False)
            else:
                ts = np.array(col.to_pylist(), dtype="datetime64[ns]")
        except (ValueError, pa.ArrowInvalid) as exc:
            raise InputError(f"time column {f.time_col!r} holds a value that is not a timestamp "
                             f"(rows {first_row}..{first_row + len(col) - 1}): {exc}") from exc
        values = np.empty((batch.num_rows, len(f.variables)), np.float64)
        for j, v in enumerate(f.variables):
            c = batch.column(batch.schema.get_field_index(v))
            try:
                values[:, j] = c.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN
            except (pa.ArrowInvalid, ValueError) as exc:
                raise InputError(f"variable column {v!r} (rows {first_row}..{first_row + len(c) - 1}) cannot be "
                                 f"read as numbers: {exc}") from exc
        if self.series_col:
            sc = batch.column(batch.schema.get_field_index(self.series_col))
            if sc.null_count:
                i = first_row + int(np.flatnonzero(sc.is_null().to_numpy(zero_copy_only=False))[0])
                raise InputError(f"series column {self.series_col!r} is empty at row {i}")
            sids = np.asarray(sc.to_pylist(), dtype=object)
        else:
            sids = None
        bad = ~np.isfinite(values)
        if bad.any():
            r, c = (int(a[0]) for a in np.nonzero(bad))
            sid = sids[r] if sids is not None else None
            raise InputError(f"{_label(self.series_col, sid)}: missing or non-finite value in column "
                             f"{f.variables[c]!r} at row {first_row + r}")
        return ts, values, sids

    # -- streaming ------------------------------------------------------------------------
    def _add_rows(self, sid, ts: np.ndarray, values: np.ndarray, file_rows: np.ndarray, emit) -> None:
        f = self.f
        st = self.states.get(sid)
        if st is None:
            st = self.states[sid] = _SeriesState(values[:0], ts[:0])
        prev = st.ts[-1:]
        problem = timestamp_problem(np.concatenate([prev, ts]), f.frequency)
        if problem:
            i = problem[0] - len(prev)
            raise InputError(f"{_label(self.series_col, sid)}, row {int(file_rows[i])}: {problem[1]}")
        all_v = np.concatenate([st.values, values])
        all_t = np.concatenate([st.ts, ts])
        offset = st.rows - len(st.values)  # series-row index of all_v[0]
        if self.mode == "rolling":
            first_end = f.seq_len - 1
            for end in range(st.rows, st.rows + len(ts)):
                if end >= first_end and (end - first_end) % self.stride == 0:
                    k = end - offset + 1
                    self.pending.append((sid, all_v[k - f.seq_len:k], all_t[k - f.seq_len:k]))
                    if len(self.pending) >= self.batch_windows:
                        emit()
        st.rows += len(ts)
        st.values, st.ts = all_v[-f.seq_len:].copy(), all_t[-f.seq_len:].copy()

    def _flush(self, writer: _Writer, summary: ServeSummary) -> None:
        if not self.pending:
            return
        f = self.f
        values = np.stack([p[1] for p in self.pending])
        ts = np.stack([p[2] for p in self.pending])
        y = f.predict_many(values, ts)  # [W, pred_len, N]
        w, h = len(self.pending), f.pred_len
        cols: dict[str, pa.Array] = {}
        if self.series_col:
            cols[self.series_col] = pa.array(np.repeat(np.array([p[0] for p in self.pending], dtype=object), h),
                                             type=writer.schema.field(self.series_col).type)
        ends = ts[:, -1]
        cols["window_end"] = pa.array(np.repeat(ends, h), pa.timestamp("ns"))
        cols["step"] = pa.array(np.tile(np.arange(1, h + 1, dtype=np.int32), w))
        cols[f.time_col] = pa.array(np.concatenate([f.forecast_timestamps(e) for e in ends]), pa.timestamp("ns"))
        flat = y.reshape(w * h, len(f.variables))
        for j, v in enumerate(f.variables):
            cols[v] = pa.array(flat[:, j], pa.float32())
        if f.scaler.kind == "log":
            cols[CLAMPED_COL] = pa.array(np.repeat(f.scaler.below_floor(values), h).astype(np.int32))
        writer.write(pa.table(cols, schema=writer.schema))
        summary.windows += w
        summary.rows_written += w * h
        self.pending.clear()

    def run(self, input_path: str, out: str, progress: bool = True) -> ServeSummary:
        """Serve the whole file; the output appears only if every row was valid and served."""
        if not os.path.isfile(input_path):
            raise InputError(f"input file {input_path} does not exist")
        try:
            pf = pq.ParquetFile(input_path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{input_path} is not a readable parquet file: {exc}") from exc
        schema = pf.schema_arrow
        self._check_schema(schema)
        f = self.f
        out_fields = []
        if self.series_col:
            out_fields.append(schema.field(self.series_col).with_nullable(False))
        out_fields += [pa.field("window_end", pa.timestamp("ns")), pa.field("step", pa.int32()),
                       pa.field(f.time_col, pa.timestamp("ns"))] + [pa.field(v, pa.float32()) for v in f.variables]
        if f.scaler.kind == "log":  # input values the log scaler clamped at its floor, per window
            out_fields.append(pa.field(CLAMPED_COL, pa.int32()))
        writer = _Writer(out, pa.schema(out_fields))
        summary = ServeSummary()
        t0 = time.perf_counter()
        from tqdm import tqdm

        bar = tqdm(total=pf.metadata.num_rows, unit="row", desc="serve-batch", disable=None if progress else True,
                   leave=False)
        try:
            cols = [f.time_col, *f.variables] + ([self.series_col] if self.series_col else [])
            row0 = 0
            for batch in pf.iter_batches(batch_size=READ_ROWS, columns=cols):
                ts, values, sids = self._arrays(batch, row0)
                rows = np.arange(row0, row0 + batch.num_rows)
                emit = lambda: self._flush(writer, summary)  # noqa: E731
                if sids is None:
                    self._add_rows(None, ts, values, rows, emit)
                else:
                    uniq, first = np.unique(sids.astype(str), return_index=True)
                    for k in np.argsort(first):
                        sel = sids.astype(str) == uniq[k]
                        self._add_rows(sids[first[k]], ts[sel], values[sel], rows[sel], emit)
                row0 += batch.num_rows
                bar.update(batch.num_rows)
            short = [sid for sid, st in self.states.items() if st.rows < f.seq_len]
            if not self.states:
                raise InputError(f"{input_path} has no rows")
            if short:
                sid = short[0]
                raise InputError(f"{_label(self.series_col, sid)} has {self.states[sid].rows} rows, fewer than the "
                                 f"model's seq_len {f.seq_len}" + (f" ({len(short)} such series)" if len(short) > 1 else ""))
            if self.mode == "last":
                for sid, st in self.states.items():
                    self.pending.append((sid, st.values, st.ts))
                    if len(self.pending) >= self.batch_windows:
                        self._flush(writer, summary)
            self._flush(writer, summary)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        summary.series = len(self.states)
        summary.seconds = time.perf_counter() - t0
        return summary


PROG = "timecma-serve-batch"


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.argument("input_path", metavar="INPUT.parquet")
@click.option("--bundle", required=True, type=click.Path(), help="Bundle directory written by timecma-export.")
@click.option("--out", default=None, help="Output parquet (default: INPUT stem + .forecasts.parquet).")
@click.option("--series-col", default=None, help="Column holding a series id (several series in one file).")
@click.option("--mode", type=click.Choice(["last", "rolling"]), default="last", show_default=True,
              help="Forecast from each series' last window, or from rolling windows (backtest).")
@click.option("--stride", default=24, show_default=True, help="Rows between rolling windows.")
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True)
@click.option("--store", default=None, help="Embedding store directory (created if missing); LLM runs only on misses.")
@click.option("--batch-windows", default=32, show_default=True, help="Windows per forecaster call.")
@click.option("--threads", default=None, type=int, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def serve_batch_cmd(input_path: str, bundle: str, out: str | None, series_col: str | None, mode: str, stride: int,
                    backend: str, store: str | None, batch_windows: int, threads: int | None, force: bool,
                    quiet: bool) -> None:
    """Forecast every series in INPUT.parquet with a timecma bundle; write forecasts to parquet."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("timecma").setLevel(logging.INFO if not quiet else logging.WARNING)
    out = out or os.path.splitext(input_path)[0] + ".forecasts.parquet"
    remove_dead_temporaries(os.path.dirname(os.path.abspath(out)), temp_prefix(out), "a partial output")
    if os.path.exists(out) and not force:
        fail(PROG, f"{out} exists; pass --force to replace it")
    if stride < 1:
        fail(PROG, "--stride must be at least 1")
    kwargs = {"threads": threads} if threads and backend in ("auto", "ort-cpu", "ort-cuda") else {}
    try:
        f = Forecaster.load(bundle, backend=backend, store=store, **kwargs)
    except (InputError, BundleError, BackendUnavailable, OSError) as exc:
        fail(PROG, exc)
    try:
        summary = BatchServer(f, series_col, mode, stride, batch_windows).run(input_path, out, progress=not quiet)
    except (InputError, BundleError, BackendUnavailable) as exc:
        fail(PROG, exc, " (no output written)")
    finally:
        f.close()
    s = f.stats
    click.echo(f"serve-batch: {summary.series} series, {summary.windows} windows, {summary.rows_written} forecast rows "
               f"-> {out}; store hits {s.hits} / misses {s.misses}; backend {f.backend.name}; "
               f"{summary.seconds:.2f} s ({summary.windows / max(summary.seconds, 1e-9):.1f} windows/s)"
               + (f"; {s.clamped} input values clamped at the log scaler's floor (column {CLAMPED_COL})"
                  if f.scaler.kind == "log" else ""))
