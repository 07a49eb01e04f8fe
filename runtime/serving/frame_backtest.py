"""A rolling-origin backtest of an in-memory frame (``Forecaster.backtest``), driven by the batch server.

The batch server (``batch``) builds on the forecaster; the forecaster's ``backtest`` convenience calls
this module when it runs, so the forecaster module itself never imports the batch server: the
dependency runs one way, batch scoring -> forecaster. Torch-free; pandas only for a DataFrame in/out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from timecma.core.conformal import parse_levels

from .batch import BatchServer, TableSink, check_input_schema, output_schema

if TYPE_CHECKING:
    from .forecaster import Forecaster


def backtest_frame(f: "Forecaster", frame, stride: int = 24, levels=None, series_col: str | None = None):
    """Forecasts from a window every ``stride`` rows of ``frame`` (a DataFrame or Arrow table: time column +
    variables, optional series column), scored against the actuals that follow each cutoff.

    Returns ``(forecasts, metrics)``: a DataFrame (series, ``cutoff``, ``step``, time, variables, interval
    columns) and the metrics dict ``timecma-serve-batch --metrics`` writes (model and naive baselines)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    levels = parse_levels(levels)
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    check_input_schema(table.schema, f.time_col, f.variables, series_col, "frame")
    metrics = f.backtest_metrics(levels)
    server = BatchServer(f, series_col, "rolling", stride, levels=levels, metrics=metrics)
    sid_field = table.schema.field(series_col).with_nullable(False) if series_col else None
    sink = TableSink(output_schema(f.manifest.data, sid_field, levels))
    if series_col:
        for sid in dict.fromkeys(table.column(series_col).to_pylist()):
            server.feed_series(table.filter(pc.equal(table.column(series_col), sid)), sink, sid)
    else:
        server.feed(table, sink)
    server.finish(sink)
    return sink.table().to_pandas(), metrics.report(server.unscored)
