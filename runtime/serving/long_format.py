"""Long format in and out (Nixtla's ``unique_id, ds, y``; torch-free).

For a multivariate model the model's variables are the ``unique_id`` values (neuralforecast's
convention); an optional series column groups several multivariate series. Long input is pivoted
to the wide rows ``BatchServer`` reads (read whole: a timestamp's row needs every variable), and
wide forecast tables are melted to ``[series,] unique_id, ds, cutoff, y_hat[, y_hat-lo-80, ...]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from timecma.core.errors import InputError
from timecma.core.timestamps import arrow_timestamps

PREDICTION = "y_hat"


@dataclass
class LongFormat:
    id_col: str = "unique_id"
    ds_col: str = "ds"
    y_col: str = "y"


def long_to_wide(table: pa.Table, fmt: LongFormat, variables: list[str], time_col: str,
                 series_col: str | None = None) -> pa.Table:
    """Pivot long rows to one row per (series, timestamp) with a column per variable; refuse, naming the first
    offending row: unknown or missing ``unique_id`` values, duplicate ``(unique_id, ds)``, ragged timestamps."""
    need = [fmt.id_col, fmt.ds_col, fmt.y_col] + ([series_col] if series_col else [])
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise InputError(f"long input lacks column(s) {missing} (columns: {table.column_names}); name them with "
                         "--id-col/--ds-col/--target-col")
    extra = [c for c in table.column_names if c not in need]
    if extra:
        raise InputError(f"long input has unexpected column(s) {extra}; it needs {need}")
    for c in need:
        if table.column(c).null_count:
            i = int(np.flatnonzero(table.column(c).is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"row {i}: column {c!r} is empty")
    ids = np.asarray(table.column(fmt.id_col).to_pylist(), dtype=object)
    index = {v: j for j, v in enumerate(variables)}
    var = np.array([index.get(str(u), -1) for u in ids])
    if (var < 0).any():
        i = int(np.flatnonzero(var < 0)[0])
        raise InputError(f"row {i}: {fmt.id_col} {ids[i]!r} is not one of the model's variables {variables}")
    try:
        ts = arrow_timestamps(table.column(fmt.ds_col))
    except (ValueError, TypeError) as exc:
        raise InputError(f"column {fmt.ds_col!r} holds a value that is not a timestamp: {exc}") from exc
    try:
        y = table.column(fmt.y_col).cast(pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, ValueError) as exc:
        raise InputError(f"column {fmt.y_col!r} cannot be read as numbers: {exc}") from exc
    sids = np.asarray(table.column(series_col).to_pylist(), dtype=object) if series_col else None
    keys = sids.astype(str) if sids is not None else np.zeros(len(ids), dtype=str)
    _, first = np.unique(keys, return_index=True)
    parts = []
    for f in np.sort(first):  # series in order of first appearance
        rows = np.flatnonzero(keys == keys[f])
        label = f"series {sids[f]!r}: " if sids is not None else ""
        have = np.zeros(len(variables), bool)
        have[var[rows]] = True
        if not have.all():
            raise InputError(f"{label}no rows for {fmt.id_col}(s) {[v for v, h in zip(variables, have) if not h]}; "
                             f"the model needs {variables}")
        order = rows[np.lexsort((rows, var[rows], ts[rows]))]  # by time, variable, then input row
        same = (ts[order][1:] == ts[order][:-1]) & (var[order][1:] == var[order][:-1])
        if same.any():
            k = int(np.flatnonzero(same)[0])
            a, b = sorted((int(order[k]), int(order[k + 1])))
            raise InputError(f"{label}row {b} duplicates ({fmt.id_col}, {fmt.ds_col}) = ({ids[b]!r}, "
                             f"{np.datetime_as_string(ts[b], unit='s')}) of row {a}")
        stamps, start, count = np.unique(ts[order], return_index=True, return_counts=True)
        if (count != len(variables)).any():
            k = int(np.flatnonzero(count != len(variables))[0])
            at = order[start[k]:start[k] + count[k]]
            absent = [v for j, v in enumerate(variables) if j not in set(var[at].tolist())]
            raise InputError(f"{label}ragged timestamps: at {fmt.ds_col} {np.datetime_as_string(stamps[k], unit='s')} "
                             f"(row {int(at.min())}) {fmt.id_col}(s) {absent} have no row")
        wide = np.empty((len(stamps), len(variables)))
        wide[np.repeat(np.arange(len(stamps)), len(variables)), var[order]] = y[order]
        cols = ({series_col: pa.array([sids[f]] * len(stamps), type=table.schema.field(series_col).type)}
                if series_col and sids is not None else {})
        cols[time_col] = pa.array(stamps, pa.timestamp("ns"))
        cols.update({v: pa.array(wide[:, j]) for j, v in enumerate(variables)})
        parts.append(pa.table(cols))
    if not parts:
        raise InputError("long input has no rows")
    return pa.concat_tables(parts)


def long_schema(wide: pa.Schema, fmt: LongFormat, variables: list[str], time_col: str,
                levels: list[int]) -> pa.Schema:
    """The long output's columns for a wide forecast schema."""
    first = wide.field(0)
    fields = [first] if first.name != "cutoff" else []
    fields += [pa.field(fmt.id_col, pa.string()), pa.field(fmt.ds_col, pa.timestamp("ns")),
               pa.field("cutoff", pa.timestamp("ns")), pa.field(PREDICTION, pa.float32())]
    fields += [pa.field(f"{PREDICTION}-{side}-{lv}", pa.float32()) for lv in levels for side in ("lo", "hi")]
    return pa.schema(fields)


def wide_to_long(table: pa.Table, schema: pa.Schema, fmt: LongFormat, variables: list[str], time_col: str,
                 levels: list[int]) -> pa.Table:
    """Melt a wide forecast table (a column per variable and interval bound) into ``schema``'s long rows,
    variable-major within each (series, cutoff, step) so a series' rows stay together."""
    n, k = table.num_rows, len(variables)
    take = np.repeat(np.arange(n), k)  # each wide row once per variable
    cols = {}
    first = schema.field(0)
    if first.name != fmt.id_col:
        cols[first.name] = table.column(first.name).take(pa.array(take))
    cols[fmt.id_col] = pa.array(np.tile(np.array(variables, dtype=object), n), pa.string())
    cols[fmt.ds_col] = table.column(time_col).take(pa.array(take))
    cols["cutoff"] = table.column("cutoff").take(pa.array(take))

    def melt(names: list[str]) -> pa.Array:
        return pa.array(np.stack([table.column(c).to_numpy() for c in names], axis=1).reshape(-1), pa.float32())

    cols[PREDICTION] = melt(variables)
    for lv in levels:
        for side in ("lo", "hi"):
            cols[f"{PREDICTION}-{side}-{lv}"] = melt([f"{v}-{side}-{lv}" for v in variables])
    return pa.table(cols, schema=schema)


class LongSink:
    """Takes the wide tables ``BatchServer`` writes and hands their long form to ``inner``."""

    def __init__(self, inner, wide: pa.Schema, fmt: LongFormat, variables: list[str], time_col: str,
                 levels: list[int]):
        self.inner, self.schema = inner, wide
        self.args = (fmt, variables, time_col, levels)

    def write(self, table: pa.Table) -> None:
        self.inner.write(wide_to_long(table, self.inner.schema, *self.args))
