"""Batch forecasts for every series of parquet files (docs/design.md §10): ``BatchServer``, the input
schemas and the atomic parquet writer; the command line is ``batch_cli``.

INPUT is one parquet file, a directory of them or a glob. The input is streamed record batch
by record batch, so files larger than memory work: per series only the last seq_len rows are
kept. Windows are forecast in small batches (LLM only on store misses) and written to a
temporary parquet file next to the output, renamed into place only when the whole input was
valid and served. ``ray_batch`` runs the same ``BatchServer`` per series on a Ray cluster.
Torch-free.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from timecma.core.errors import InputError, WriteError
from timecma.core.files import check_replaceable
from timecma.core.manifest import DataRecord
from timecma.core.timestamps import arrow_timestamps, timestamp_problem

from .backtest import BacktestMetrics
from .long_format import LongFormat, LongSink, long_schema, long_to_wide

if TYPE_CHECKING:  # a server takes a loaded forecaster; Forecaster.backtest runs one
    from .forecaster import Forecaster

log = logging.getLogger(__name__)

READ_ROWS = 65536


@dataclass
class _SeriesState:
    """The tail of one series: the rows a later window may still need."""

    values: np.ndarray  # [<= seq_len, N] float64
    ts: np.ndarray  # [<= seq_len] datetime64[ns]
    rows: int = 0  # rows seen so far in this series


@dataclass
class _Open:
    """A rolling window waiting for its forecast and for the actuals after its cutoff (backtest metrics)."""

    end: int  # series-row index of the cutoff
    x: np.ndarray  # [L, N]
    y: np.ndarray  # [H, N] actuals, filled as rows arrive
    filled: int = 0
    y_hat: np.ndarray | None = None
    intervals: dict | None = None


@dataclass
class ServeSummary:
    series: int = 0
    windows: int = 0
    rows_written: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


CLAMPED_COL = "clamped_inputs"
OUTPUT_MARK = b"timecma.output"  # schema metadata of every parquet file serve-batch writes (local and Ray)
SERVE_OUTPUT = "a forecasts output of timecma-serve-batch (its parquet file, or with --ray its folder of them)"


def _marked(schema: pa.Schema) -> pa.Schema:
    return schema.with_metadata({**(schema.metadata or {}), OUTPUT_MARK: b"timecma-serve-batch"})


def is_serve_output(path: str) -> bool:
    """What serve-batch may replace with --force: a parquet file it wrote (its schema carries ``OUTPUT_MARK``),
    or a folder (``--ray``) holding only such files. Columns prove nothing (another tool's backtest has a
    ``cutoff`` and a ``step`` too), so an output written before the mark is refused like any file of the user's,
    with the message to delete it."""
    if os.path.isdir(path) and not os.path.islink(path):
        names = os.listdir(path)
        return bool(names) and all(n.endswith(".parquet") and _is_forecast_file(os.path.join(path, n)) for n in names)
    return os.path.isfile(path) and _is_forecast_file(path)


def _is_forecast_file(path: str) -> bool:
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return False
    return OUTPUT_MARK in (schema.metadata or {})


def temp_prefix(out: str) -> str:
    """Hidden temporary beside the output: .NAME.tmp-PID (the PID tells dead ones from live ones)."""
    return f".{os.path.basename(os.path.abspath(out))}.tmp-"


class _Writer:
    """Appends forecast rows to a temporary parquet file; ``commit`` renames it into place."""

    def __init__(self, out: str, schema: pa.Schema):
        self.out = out
        d, name = os.path.split(os.path.abspath(out))
        self.tmp = os.path.join(d, f"{temp_prefix(out)}{os.getpid()}")
        self.schema = _marked(schema)
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        try:
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.tmp, self.schema)
            self.writer.write_table(table)
        except OSError as exc:
            raise self._failed(exc) from exc

    def commit(self) -> None:
        try:
            if self.writer is None:  # nothing to write still yields a valid, empty file
                self.writer = pq.ParquetWriter(self.tmp, self.schema)
            self.writer.close()
            check_replaceable(self.out, is_serve_output, SERVE_OUTPUT)  # never a file serve-batch did not write
            os.replace(self.tmp, self.out)
        except OSError as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: OSError) -> WriteError:
        return WriteError(f"cannot write the output {self.out}: {exc.strerror or exc}")

    def abort(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError:  # a full disk fails the close too; the temporary goes either way
                pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


FILE_COL = "file"  # the series id when several files are served without --series-col: one file, one series


def list_inputs(spec: str) -> tuple[list[str], str]:
    """One parquet file, a directory (its ``*.parquet`` files, recursively) or a glob -> (sorted files, root).

    The root is the folder series ids of file-per-series inputs are named relative to."""
    if os.path.isdir(spec):
        files = sorted(glob.glob(os.path.join(spec, "**", "*.parquet"), recursive=True))
        root = spec
        if not files:
            raise InputError(f"directory {spec} holds no *.parquet files")
    elif glob.has_magic(spec):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise InputError(f"no file matches {spec!r}")
        root = _common_root(files)
    elif os.path.isfile(spec):
        files, root = [spec], os.path.dirname(os.path.abspath(spec))
    else:
        raise InputError(f"input file {spec} does not exist")
    return files, root


def series_name(path: str, root: str) -> str:
    """The series id of a file-per-series input: its path under the input root, '/'-separated."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")


def check_input_schema(schema: pa.Schema, time_col: str, variables: list[str], series_col: str | None,
                       where: str = "input") -> None:
    """Refuse a file whose columns cannot be served, naming the column (docs/design.md §10)."""
    names = schema.names
    if time_col not in names:
        raise InputError(f"{where} has no time column {time_col!r} (columns: {names})")
    if series_col and series_col not in names:
        raise InputError(f"{where} has no series column {series_col!r} (columns: {names})")
    missing = [v for v in variables if v not in names]
    if missing:
        raise InputError(f"{where} lacks variable column(s) {missing}; the model needs {variables}")
    extra = [c for c in names if c not in variables and c not in (time_col, series_col)]
    if extra:
        hint = " (pass --series-col for a series id column)" if not series_col else ""
        raise InputError(f"{where} has unexpected column(s) {extra}; the model's variables are {variables}{hint}")
    for v in variables:
        t = schema.field(v).type
        if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_decimal(t)):
            raise InputError(f"variable column {v!r} has type {t}; numbers are needed")
    t = schema.field(time_col).type
    if not (pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise InputError(f"time column {time_col!r} has type {t}; timestamps or ISO strings are needed")


def read_schemas(files: list[str], time_col: str, variables: list[str],
                 series_col: str | None) -> tuple[pa.Field | None, int]:
    """Check every file's columns from its footer; the output's series id field (None: one series) and the
    number of input rows."""
    sid_field, rows = None, 0
    for path in files:
        try:
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path} is not a readable parquet file: {exc}") from exc
        rows += pf.metadata.num_rows
        check_input_schema(schema, time_col, variables, series_col, path if len(files) > 1 else "input")
        if series_col:
            f = schema.field(series_col).with_nullable(False)
            if sid_field is not None and f.type != sid_field.type:
                raise InputError(f"series column {series_col!r} is {sid_field.type} in {files[0]} but {f.type} "
                                 f"in {path}; the files must agree")
            sid_field = f
    if not series_col and len(files) > 1:
        sid_field = pa.field(FILE_COL, pa.string(), nullable=False)
    return sid_field, rows


def interval_col(variable: str, side: str, level: int) -> str:
    """Nixtla's naming: ``{var}-lo-80``, ``{var}-hi-80``."""
    return f"{variable}-{side}-{level}"


def output_schema(data: DataRecord, sid_field: pa.Field | None, levels: list[int] | None = None) -> pa.Schema:
    """One row per (series, cutoff, step): the cutoff (the window's last input timestamp, as Nixtla's
    cross-validation), the forecast timestamp, one float32 column per variable and per interval bound."""
    fields = [sid_field] if sid_field is not None else []
    fields += [pa.field("cutoff", pa.timestamp("ns")), pa.field("step", pa.int32()),
               pa.field(data.time_col, pa.timestamp("ns"))] + [pa.field(v, pa.float32()) for v in data.variables]
    fields += [pa.field(interval_col(v, side, lv), pa.float32())
               for lv in levels or [] for v in data.variables for side in ("lo", "hi")]
    if data.scaler_kind == "log":  # input values the log scaler clamped at its floor, per window
        fields.append(pa.field(CLAMPED_COL, pa.int32()))
    return _marked(pa.schema(fields))


class TableSink:
    """Collects forecast tables in memory (one series group on a Ray worker)."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        self.tables: list[pa.Table] = []

    def write(self, table: pa.Table) -> None:
        self.tables.append(table)

    def table(self) -> pa.Table:
        return pa.concat_tables(self.tables) if self.tables else self.schema.empty_table()


class BatchServer:
    """Turns rows of one or more series into forecast rows; ``run`` streams files into one output file.

    ``feed`` takes rows in order (a series may continue over several calls and files),
    ``finish`` forecasts what is left (``last`` mode) and checks every series was long enough.
    The output schema's first field, when it is not ``cutoff``, holds the series id."""

    def __init__(self, forecaster: Forecaster, series_col: str | None = None, mode: str = "last", stride: int = 24,
                 batch_windows: int = 32, levels: list[int] | None = None, metrics: BacktestMetrics | None = None):
        if mode not in ("last", "rolling"):
            raise ValueError(f"mode must be 'last' or 'rolling', got {mode!r}")
        if stride < 1:
            raise ValueError("stride must be at least 1")
        if metrics is not None and mode != "rolling":
            raise InputError("backtest metrics need --mode rolling (a last window has no actuals after it)")
        self.f, self.series_col, self.mode, self.stride = forecaster, series_col, mode, stride
        self.batch_windows = batch_windows
        self.levels = list(levels or [])
        if self.levels:
            forecaster.check_levels(self.levels)
        self.metrics = metrics
        self.open: dict = {}  # series id -> [_Open] (with metrics only)
        self.unscored = 0
        self.states: dict = {}
        self.pending: list[tuple] = []  # (series id, values [L,N], ts [L], _Open or None)
        self.summary = ServeSummary()

    def _label(self, sid) -> str:
        return f"series {sid!r}" if sid is not None else "input"

    # -- input checks -------------------------------------------------------------------
    def arrays(self, batch: pa.RecordBatch | pa.Table, first_row: int = 0, where: str = ""):
        """Timestamps [R], values [R, N] float64 and series ids [R] (or None) of a batch, checked."""
        f, at = self.f, f"{where}: " if where else ""
        col = batch.column(f.time_col)
        if col.null_count:
            i = first_row + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{at}time column {f.time_col!r} is empty at row {i}")
        try:
            ts = arrow_timestamps(col)
        except (ValueError, pa.ArrowInvalid) as exc:
            raise InputError(f"{at}time column {f.time_col!r} holds a value that is not a timestamp "
                             f"(rows {first_row}..{first_row + len(col) - 1}): {exc}") from exc
        values = np.empty((batch.num_rows, len(f.variables)), np.float64)
        for j, v in enumerate(f.variables):
            c = batch.column(v)
            try:
                values[:, j] = c.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN
            except (pa.ArrowInvalid, ValueError) as exc:
                raise InputError(f"{at}variable column {v!r} (rows {first_row}..{first_row + len(c) - 1}) cannot "
                                 f"be read as numbers: {exc}") from exc
        if self.series_col:
            sc = batch.column(self.series_col)
            if sc.null_count:
                i = first_row + int(np.flatnonzero(sc.is_null().to_numpy(zero_copy_only=False))[0])
                raise InputError(f"{at}series column {self.series_col!r} is empty at row {i}")
            sids = np.asarray(sc.to_pylist(), dtype=object)
        else:
            sids = None
        bad = ~np.isfinite(values)
        if bad.any():
            r, c = (int(a[0]) for a in np.nonzero(bad))
            sid = sids[r] if sids is not None else None
            raise InputError(f"{at}{self._label(sid)}: missing or non-finite value in column "
                             f"{f.variables[c]!r} at row {first_row + r}")
        return ts, values, sids

    # -- streaming ------------------------------------------------------------------------
    def _add_rows(self, sid, ts: np.ndarray, values: np.ndarray, rows: np.ndarray | None, sink) -> None:
        """Append rows of one series; ``rows`` numbers them for messages (None: name the timestamp)."""
        f = self.f
        st = self.states.get(sid)
        if st is None:
            st = self.states[sid] = _SeriesState(values[:0], ts[:0])
        prev = st.ts[-1:]
        problem = timestamp_problem(np.concatenate([prev, ts]), f.frequency)
        if problem:
            i = problem[0] - len(prev)
            at = f"row {int(rows[i])}" if rows is not None else f"at {np.datetime_as_string(ts[i], unit='s')}"
            raise InputError(f"{self._label(sid)}, {at}: {problem[1]}")
        all_v = np.concatenate([st.values, values])
        all_t = np.concatenate([st.ts, ts])
        offset = st.rows - len(st.values)  # series-row index of all_v[0]
        if self.mode == "rolling":
            first_end = f.seq_len - 1
            for end in range(st.rows, st.rows + len(ts)):
                if end >= first_end and (end - first_end) % self.stride == 0:
                    k = end - offset + 1
                    o = None
                    if self.metrics is not None:
                        o = _Open(end, all_v[k - f.seq_len:k], np.empty((f.pred_len, len(f.variables))))
                        self.open.setdefault(sid, []).append(o)
                    self.pending.append((sid, all_v[k - f.seq_len:k], all_t[k - f.seq_len:k], o))
                    if len(self.pending) >= self.batch_windows:
                        self._flush(sink)
        if self.metrics is not None:
            self._fill_actuals(sid, st.rows, values)
        st.rows += len(ts)
        st.values, st.ts = all_v[-f.seq_len:].copy(), all_t[-f.seq_len:].copy()

    def _fill_actuals(self, sid, first: int, values: np.ndarray) -> None:
        """Rows ``first``.. of series ``sid`` are the actuals of open windows whose horizon they fall in."""
        h, last = self.f.pred_len, first + len(values) - 1
        for o in self.open.get(sid, []):
            a, b = max(o.end + 1, first), min(o.end + h, last)
            if a <= b:
                o.y[a - o.end - 1:b - o.end] = values[a - first:b - first + 1]
                o.filled += b - a + 1
        self._score(sid)

    def _score(self, sid) -> None:
        """Windows with their forecast and every actual go into the metrics and leave the open list."""
        done: list[tuple[_Open, np.ndarray, dict]] = []  # with its forecast and intervals (set together)
        waiting: list[_Open] = []
        for o in self.open.get(sid, []):
            if o.y_hat is not None and o.intervals is not None and o.filled == self.f.pred_len:
                done.append((o, o.y_hat, o.intervals))
            else:
                waiting.append(o)
        if not done:
            return
        assert self.metrics is not None, "windows are kept open only to be scored (with metrics)"
        self.open[sid] = waiting
        ivs = {lv: (np.stack([iv[lv][0] for _, _, iv in done]), np.stack([iv[lv][1] for _, _, iv in done]))
               for lv in self.levels}
        self.metrics.add(np.stack([o.x for o, _, _ in done]), np.stack([o.y for o, _, _ in done]),
                         np.stack([y_hat for _, y_hat, _ in done]), ivs)

    def feed(self, batch: pa.RecordBatch | pa.Table, sink, first_row: int = 0, sid=None, where: str = "") -> None:
        """Rows in file order; ``sid`` names the series of a file without a series column."""
        ts, values, sids = self.arrays(batch, first_row, where)
        rows = np.arange(first_row, first_row + batch.num_rows)
        if sids is None:
            self._add_rows(sid, ts, values, rows, sink)
            return
        keys = sids.astype(str)
        uniq, first = np.unique(keys, return_index=True)
        for k in np.argsort(first):
            sel = keys == uniq[k]
            self._add_rows(sids[first[k]], ts[sel], values[sel], rows[sel], sink)

    def feed_series(self, table: pa.Table, sink, sid) -> None:
        """All rows of one series in any order (a Ray group after its shuffle): served in time order."""
        ts, values, _ = self.arrays(table)
        order = np.argsort(ts, kind="stable")  # duplicates stay adjacent and are refused by the gap check
        self._add_rows(sid, ts[order], values[order], None, sink)

    def finish(self, sink, what: str = "input") -> None:
        """Refuse series shorter than seq_len, forecast last windows, flush."""
        f = self.f
        if not self.states:
            raise InputError(f"{what} has no rows")
        short = [sid for sid, st in self.states.items() if st.rows < f.seq_len]
        if short:
            sid = short[0]
            raise InputError(f"{self._label(sid)} has {self.states[sid].rows} rows, fewer than the model's seq_len "
                             f"{f.seq_len}" + (f" ({len(short)} such series)" if len(short) > 1 else ""))
        if self.mode == "last":
            for sid, st in self.states.items():
                self.pending.append((sid, st.values, st.ts, None))
                if len(self.pending) >= self.batch_windows:
                    self._flush(sink)
        self._flush(sink)
        self.summary.series = len(self.states)
        self.unscored = sum(len(v) for v in self.open.values())  # horizons past the end of the input

    def _flush(self, sink) -> None:
        if not self.pending:
            return
        f = self.f
        values = np.stack([p[1] for p in self.pending])
        ts = np.stack([p[2] for p in self.pending])
        y = f.predict_many(values, ts)  # [W, pred_len, N]
        ivs = f.intervals(values, y, self.levels) if self.levels else {}
        w, h = len(self.pending), f.pred_len
        cols: dict[str, pa.Array] = {}
        first = sink.schema.field(0)
        if first.name != "cutoff":  # the series id column
            cols[first.name] = pa.array(np.repeat(np.array([p[0] for p in self.pending], dtype=object), h),
                                        type=first.type)
        ends = ts[:, -1]
        cols["cutoff"] = pa.array(np.repeat(ends, h), pa.timestamp("ns"))
        cols["step"] = pa.array(np.tile(np.arange(1, h + 1, dtype=np.int32), w))
        cols[f.time_col] = pa.array(np.concatenate([f.forecast_timestamps(e) for e in ends]), pa.timestamp("ns"))
        flat = y.reshape(w * h, len(f.variables))
        for j, v in enumerate(f.variables):
            cols[v] = pa.array(flat[:, j], pa.float32())
        for lv, bounds in ivs.items():
            for side, b in zip(("lo", "hi"), bounds):
                b = b.reshape(w * h, len(f.variables))
                for j, v in enumerate(f.variables):
                    cols[interval_col(v, side, lv)] = pa.array(b[:, j], pa.float32())
        if f.scaler.kind == "log":
            cols[CLAMPED_COL] = pa.array(np.repeat(f.scaler.below_floor(values), h).astype(np.int32))
        sink.write(pa.table(cols, schema=sink.schema))
        self.summary.windows += w
        self.summary.rows_written += w * h
        if self.metrics is not None:
            for i, p in enumerate(self.pending):
                p[3].y_hat, p[3].intervals = y[i], {lv: (lo[i], hi[i]) for lv, (lo, hi) in ivs.items()}
            for sid in dict.fromkeys(p[0] for p in self.pending):
                self._score(sid)
        self.pending.clear()

    def run(self, inputs: str | list[str], out: str, progress: bool = True,
            long: LongFormat | None = None) -> ServeSummary:
        """Serve a file, a directory or glob of files, or a list of files; the output appears only if every
        row was valid and served. Several files without a series column: each file is one series.
        ``long``: input and output in long format (read whole, see ``long_format``)."""
        files, root = list_inputs(inputs) if isinstance(inputs, str) else (list(inputs), _common_root(inputs))
        if long is not None:
            return self._run_long(files, out, long)
        f = self.f
        sid_field, total = read_schemas(files, f.time_col, f.variables, self.series_col)
        per_file = not self.series_col and len(files) > 1
        writer = _Writer(out, output_schema(f.manifest.data, sid_field, self.levels))
        t0 = time.perf_counter()
        from tqdm import tqdm

        bar = tqdm(total=total, unit="row", desc="serve-batch", disable=None if progress else True, leave=False)
        try:
            cols = [f.time_col, *f.variables] + ([self.series_col] if self.series_col else [])
            for path in files:
                sid = series_name(path, root) if per_file else None
                where = path if len(files) > 1 else ""
                row0 = 0
                for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS, columns=cols):
                    self.feed(batch, writer, row0, sid, where)
                    row0 += batch.num_rows
                    bar.update(batch.num_rows)
            self.finish(writer, files[0] if len(files) == 1 else f"{inputs!r}")
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        self.summary.seconds = time.perf_counter() - t0
        return self.summary

    def _run_long(self, files: list[str], out: str, fmt: LongFormat) -> ServeSummary:
        f, t0 = self.f, time.perf_counter()
        try:
            table = pa.concat_tables([pq.read_table(p) for p in files])
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"cannot read the long input as one table: {exc}") from exc
        wide = long_to_wide(table, fmt, f.variables, f.time_col, self.series_col)
        sid_field = wide.schema.field(self.series_col).with_nullable(False) if self.series_col else None
        wide_schema = output_schema(f.manifest.data, sid_field, self.levels)
        writer = _Writer(out, long_schema(wide_schema, fmt, f.variables, f.time_col, self.levels))
        sink = LongSink(writer, wide_schema, fmt, f.variables, f.time_col, self.levels)
        try:
            self.feed(wide, sink)
            self.finish(sink, files[0] if len(files) == 1 else "input")
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        self.summary.seconds = time.perf_counter() - t0
        return self.summary


def _common_root(files: list[str]) -> str:
    return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in files])
