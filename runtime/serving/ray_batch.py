"""`timecma-serve-batch INPUT --ray`: the same BatchServer, one series per call, on Ray Data (docs/design.md §13).

The driver checks every file's columns from the parquet footers (the same refusals as a
local run, before any worker starts), Ray Data reads the files, groups rows by series
(``--series-col``, else one file = one series) and hands each group to an actor that loaded
the bundle once and keeps its embedding store on its node's local disk. Each actor returns
the group's forecast rows; Ray writes one parquet file per block into a temporary folder
beside ``--out``, renamed into place only when the whole job succeeded.

A group's rows reach the actor after a shuffle, so they are served in time order; unlike a
local run, rows need not be sorted in the files (duplicates and gaps are still refused).
Actors restart and their calls are retried when a worker dies (Ray Data's defaults); a series is served by one call, so a retry neither loses nor repeats rows.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from timecma.core.conformal import no_calibration
from timecma.core.errors import InputError
from timecma.core.files import check_replaceable, replace_dir
from timecma.core.manifest import read_manifest
from timecma.core.ray_setup import RayPool, actor_cpus, connect, unwrap

from ..backends.base import threads_option
from .batch import SERVE_OUTPUT, BatchServer, TableSink, is_serve_output, output_schema, read_schemas, series_name

log = logging.getLogger(__name__)

PATH_COL = "path"  # Ray's include_paths column: the file a row came from


def node_store_dir(namespace: str) -> str:
    """Default store of a worker: on its node's local disk (LMDB must not live on a network filesystem)."""
    return os.path.join(tempfile.gettempdir(), "timecma-stores", namespace[:16])


class SeriesScorer:
    """A Ray actor's callable: loads the bundle once, forecasts one series group per call."""

    def __init__(self, bundle: str, backend: str, store: str | None, threads: int, series_col: str | None,
                 root: str, mode: str, stride: int, batch_windows: int, schema: pa.Schema, levels: list[int]):
        from .forecaster import Forecaster

        kwargs = threads_option(backend, threads)
        self.f = Forecaster.load(bundle, backend=backend, store=store, **kwargs)
        self.series_col, self.root, self.schema = series_col, root, schema
        self.mode, self.stride, self.batch_windows, self.levels = mode, stride, batch_windows, levels

    def __call__(self, group: pa.Table) -> pa.Table:
        if self.series_col:
            sid = group.column(self.series_col)[0].as_py()
        else:
            sid = series_name(group.column(PATH_COL)[0].as_py(), self.root)
        server = BatchServer(self.f, self.series_col, self.mode, self.stride, self.batch_windows, self.levels)
        sink = TableSink(self.schema)
        server.feed_series(group, sink, sid if self.schema.field(0).name != "cutoff" else None)
        server.finish(sink)
        return sink.table()


@dataclass
class RaySummary:
    files: int
    series: int
    windows: int
    rows_written: int
    output_files: int
    seconds: float


def serve_batch_on_ray(files: list[str], root: str, bundle: str, out: str, *, series_col: str | None = None,
                       mode: str = "last", stride: int = 24, backend: str = "auto", store: str | None = None,
                       batch_windows: int = 32, threads: int | None = None, pool: RayPool | None = None,
                       levels: list[int] | None = None,
                       force: bool = False, progress: bool = True) -> RaySummary:
    """Serve ``files`` on the Ray cluster at ``pool.address`` into the directory ``out`` (one parquet file per
    block). Bundle and input columns are checked before the cluster is joined."""
    import ray.data

    t0 = time.perf_counter()
    pool = pool or RayPool()
    manifest = read_manifest(bundle)
    data = manifest.data
    sid_field, _ = read_schemas(files, data.time_col, data.variables, series_col)
    if store is None and manifest.llm is not None:
        store = node_store_dir(manifest.llm.namespace)
        log.info("embedding store on each node's local disk: %s", store)
    if os.path.lexists(out) and not force:
        raise InputError(f"{out} exists; pass --force to replace it")
    check_replaceable(out, is_serve_output, SERVE_OUTPUT)  # before the cluster is joined
    connect(pool.address, progress=progress)
    num_workers = pool.num_workers
    cpus = actor_cpus(num_workers, pool.cpus_per_worker)
    if levels and not manifest.info.get("calibration"):
        raise no_calibration(bundle)
    schema = output_schema(data, sid_field, levels)

    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-{os.getpid()}-", dir=parent)
    try:
        cols = [data.time_col, *data.variables] + ([series_col] if series_col else [])
        ds = ray.data.read_parquet(files, columns=cols, include_paths=not series_col,
                                   override_num_blocks=max(len(files), 2 * num_workers))
        key = series_col or PATH_COL
        scored = ds.groupby(key, num_partitions=2 * num_workers).map_groups(
            SeriesScorer, batch_format="pyarrow",
            fn_constructor_kwargs=dict(bundle=os.path.abspath(bundle), backend=backend, store=store,
                                       threads=threads or max(1, int(round(cpus))), series_col=series_col,
                                       root=root, mode=mode, stride=stride, batch_windows=batch_windows,
                                       schema=schema, levels=list(levels or [])),
            compute=ray.data.ActorPoolStrategy(size=num_workers), num_cpus=cpus, num_gpus=pool.gpus_per_worker or None)
        # a dead worker is replaced and its series served again: Ray Data's actor pools default to
        # max_restarts=-1 and max_task_retries=-1 (tests/test_ray.py kills one mid-job)
        scored.write_parquet(tmp)
        written = sorted(n for n in os.listdir(tmp) if n.endswith(".parquet"))
        if not written:  # no rows at all still yields a readable dataset
            pq.write_table(schema.empty_table(), os.path.join(tmp, "part-00000.parquet"))
            written = ["part-00000.parquet"]
        ids = pq.read_table(tmp, columns=[schema.field(0).name]).column(0)  # series ids (or window ends)
        rows = len(ids)
        series = len(pc.unique(ids)) if sid_field is not None else (1 if rows else 0)
        _commit(tmp, out, force)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        ours = unwrap(exc)
        if ours is exc:
            raise
        raise ours from None  # the worker's own message and exit code, not Ray's wrapper
    windows = rows // manifest.model_config.pred_len
    return RaySummary(len(files), series, windows, rows, len(written), time.perf_counter() - t0)


def _commit(tmp: str, out: str, force: bool) -> None:
    """Rename the finished folder into place (``timecma.core.files.replace_dir``); with ``force`` an old output
    (one serve-batch wrote, or an empty folder or file: anything else is refused untouched) is moved aside,
    put back if the rename fails, and removed only after it."""
    if os.path.lexists(out) and not force:
        raise InputError(f"{out} exists; pass --force to replace it")
    replace_dir(tmp, out, is_serve_output, SERVE_OUTPUT)
