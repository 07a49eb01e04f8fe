"""`timecma-serve-batch INPUT`: the command line over ``BatchServer``, on this machine or on Ray.

It sits above both ``batch`` (the local server) and ``ray_batch`` (the same server per series on
Ray Data), so neither imports the other's runner. Torch-free.
"""

from __future__ import annotations

import json
import logging
import os

import click

from timecma.core.errors import EXIT_CODES_HELP, BackendUnavailable, BundleError, InputError, WriteError, fail
from timecma.core.conformal import parse_levels
from timecma.core.files import atomic_write_bytes, check_replaceable
from timecma.core.leftovers import remove_dead_temporaries

from ..backends.base import BACKENDS, threads_option
from .backtest import table
from .batch import CLAMPED_COL, SERVE_OUTPUT, BatchServer, is_serve_output, list_inputs, temp_prefix
from .forecaster import Forecaster
from .long_format import LongFormat

PROG = "timecma-serve-batch"
METRICS_REPORT = "a backtest metrics file of timecma-serve-batch"


def is_metrics_report(path: str) -> bool:
    """A ``--metrics`` JSON file serve-batch wrote (the keys ``BacktestMetrics.report`` always writes)."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"windows", "season_length", "units", "model"} <= set(report)


def _check_outputs(out: str, metrics_path: str | None, force: bool) -> None:
    """Before any work: what is at the outputs may be replaced only with --force, and only when serve-batch
    wrote it (or it is empty); anything else is refused, untouched."""
    for path, what, ours in ((out, SERVE_OUTPUT, is_serve_output),
                             *([(metrics_path, METRICS_REPORT, is_metrics_report)] if metrics_path else [])):
        if os.path.lexists(path) and not force:
            fail(PROG, f"{path} exists; pass --force to replace it")
        try:
            check_replaceable(path, ours, what)
        except InputError as exc:
            fail(PROG, exc)


def _ray_address(value: str | None) -> str | None:
    if value is not None and value.endswith(".parquet"):  # `--ray in.parquet` took the input as the address
        raise click.BadParameter(f"{value!r} looks like the input, not a cluster address; put INPUT before --ray",
                                 param_hint="--ray")
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.argument("input_path", metavar="INPUT")
@click.option("--bundle", required=True, type=click.Path(), help="Bundle directory written by timecma-export.")
@click.option("--out", default=None,
              help="Output parquet (default: INPUT stem + .forecasts.parquet); with --ray a directory of parquet "
                   "files (default: INPUT stem + .forecasts), which every node must reach (shared or local disk).")
@click.option("--series-col", default=None,
              help="Column holding a series id (several series in one file, a series may span files). Without "
                   "it, several files are several series: one per file, named in a 'file' column.")
@click.option("--mode", type=click.Choice(["last", "rolling"]), default="last", show_default=True,
              help="Forecast from each series' last window, or from rolling windows (backtest).")
@click.option("--stride", default=24, show_default=True, help="Rows between rolling windows.")
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True)
@click.option("--store", default=None,
              help="Embedding store directory (created if missing); LLM runs only on misses. With --ray a path on "
                   "each node's LOCAL disk (LMDB must not be on a network filesystem; default: the node's temp dir).")
@click.option("--batch-windows", default=32, show_default=True, help="Windows per forecaster call.")
@click.option("--threads", default=None, type=int, help="ONNX Runtime intra-op threads (default: all cores; with "
                                                        "--ray the worker's CPUs).")
@click.option("--ray", "ray_address", default=None, is_flag=False, flag_value="local", callback=lambda c, p, v:
              _ray_address(v), metavar="[ADDRESS]",
              help="Run on Ray Data: alone, a local cluster; 'auto', host:port or ray://host:10001 joins one.")
@click.option("--num-workers", default=1, show_default=True, help="--ray: actors, each with the bundle loaded once.")
@click.option("--cpus-per-worker", default=None, type=float,
              help="--ray: CPUs per actor (default: a share leaving one CPU for reading and shuffling).")
@click.option("--gpus-per-worker", default=0.0, show_default=True, type=float, help="--ray: GPUs per actor.")
@click.option("--levels", default=None, metavar="80,95",
              help="Prediction intervals at these coverage levels (split conformal, calibrated on the validation "
                   "split at training): columns {var}-lo-80, {var}-hi-80, ...")
@click.option("--metrics", "metrics_path", default=None, type=click.Path(dir_okay=False),
              help="--mode rolling: score each window whose horizon is in the input against those actuals; write "
                   "the model's and the naive forecasts' MSE, MAE, MASE, sMAPE (and interval coverage) as JSON.")
@click.option("--format", "fmt", type=click.Choice(["wide", "long"]), default="wide", show_default=True,
              help="long: input rows (unique_id, ds, y) with the model's variables as unique_id values, output rows "
                   "(unique_id, ds, cutoff, y_hat, intervals); --series-col groups several multivariate series.")
@click.option("--id-col", default="unique_id", show_default=True, help="--format long: the variable column.")
@click.option("--ds-col", default="ds", show_default=True, help="--format long: the timestamp column.")
@click.option("--target-col", default="y", show_default=True, help="--format long: the value column.")
@click.option("--force", is_flag=True, help="Replace an existing output (and --metrics file) that serve-batch wrote; "
                                           "anything else there is refused.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def serve_batch_cmd(input_path: str, bundle: str, out: str | None, series_col: str | None, mode: str, stride: int,
                    backend: str, store: str | None, batch_windows: int, threads: int | None,
                    ray_address: str | None, num_workers: int, cpus_per_worker: float | None,
                    gpus_per_worker: float, levels: str | None, metrics_path: str | None, fmt: str, id_col: str,
                    ds_col: str, target_col: str, force: bool, quiet: bool) -> None:
    """Forecast every series in INPUT (a parquet file, a directory of them or a quoted glob) with a timecma
    bundle; write forecasts to parquet."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("timecma").setLevel(logging.INFO if not quiet else logging.WARNING)
    stem = os.path.splitext(input_path.rstrip("/").replace("*", "all"))[0]
    out = out or stem + (".forecasts" if ray_address else ".forecasts.parquet")
    remove_dead_temporaries(os.path.dirname(os.path.abspath(out)), temp_prefix(out), "a partial output")
    _check_outputs(out, metrics_path, force)
    if stride < 1:
        fail(PROG, "--stride must be at least 1")
    try:
        level_list = parse_levels(levels)
    except InputError as exc:
        fail(PROG, exc)
    if metrics_path and mode != "rolling":
        fail(PROG, "--metrics needs --mode rolling: a backtest scores rolling windows against the actuals after them")
    if ray_address:
        if metrics_path or fmt == "long":
            fail(PROG, "--metrics and --format long run in a single process; drop --ray")
        _serve_on_ray(input_path, bundle, out, series_col, mode, stride, backend, store, batch_windows, threads,
                      ray_address, num_workers, cpus_per_worker, gpus_per_worker, force, quiet, level_list)
        return
    kwargs = threads_option(backend, threads)
    try:
        f = Forecaster.load(bundle, backend=backend, store=store, **kwargs)
    except (InputError, BundleError, BackendUnavailable, OSError) as exc:
        fail(PROG, exc)
    try:
        metrics = f.backtest_metrics(level_list) if metrics_path else None
        server = BatchServer(f, series_col, mode, stride, batch_windows, levels=level_list, metrics=metrics)
        summary = server.run(input_path, out, progress=not quiet,
                             long=LongFormat(id_col, ds_col, target_col) if fmt == "long" else None)
    except (InputError, BundleError, BackendUnavailable, WriteError) as exc:
        fail(PROG, exc, " (no output written)")
    finally:
        f.close()
    if metrics is not None and metrics_path:
        report = metrics.report(server.unscored)
        try:
            check_replaceable(metrics_path, is_metrics_report, METRICS_REPORT)  # again: serving took a while
            atomic_write_bytes(metrics_path, json.dumps(report, indent=2).encode())
        except InputError as exc:
            fail(PROG, exc, f" (the forecasts are in {out})")
        except OSError as exc:
            fail(PROG, WriteError(f"cannot write the metrics {metrics_path}: {exc.strerror or exc}"),
                 f" (the forecasts are in {out})")
        click.echo(table(report))
    s = f.stats
    click.echo(f"serve-batch: {summary.series} series, {summary.windows} windows, {summary.rows_written} forecast rows "
               f"-> {out}; store hits {s.hits} / misses {s.misses}; backend {f.backend.name}; "
               f"{summary.seconds:.2f} s ({summary.windows / max(summary.seconds, 1e-9):.1f} windows/s)"
               + (f"; {s.clamped} input values clamped at the log scaler's floor (column {CLAMPED_COL})"
                  if f.scaler.kind == "log" else "")
               + (f"; the store could not be written {s.store_write_failures} time(s): served uncached"
                  if s.store_write_failures else ""))


def _serve_on_ray(input_path, bundle, out, series_col, mode, stride, backend, store, batch_windows, threads,
                  address, num_workers, cpus_per_worker, gpus_per_worker, force, quiet, levels) -> None:
    from timecma.core.ray_setup import RayPool  # Ray only when --ray is asked for

    from .ray_batch import serve_batch_on_ray

    try:
        files, root = list_inputs(input_path)
        s = serve_batch_on_ray(files, root, bundle, out, series_col=series_col, mode=mode, stride=stride,
                               backend=backend, store=store, batch_windows=batch_windows, threads=threads, levels=levels,
                               pool=RayPool(address, num_workers, cpus_per_worker, gpus_per_worker), force=force,
                               progress=not quiet)
    except (InputError, BundleError, BackendUnavailable) as exc:
        fail(PROG, exc, " (no output written)")
    click.echo(f"serve-batch on Ray: {s.files} file(s), {s.series} series, {s.windows} windows, {s.rows_written} "
               f"forecast rows -> {out}/ ({s.output_files} parquet files); {num_workers} worker(s); "
               f"{s.seconds:.2f} s ({s.rows_written / max(s.seconds, 1e-9):.0f} rows/s)")
