"""`timecma-plot FORECASTS --data INPUT --out plot.png`: history, forecasts of chosen cutoffs with their
intervals, and the actuals where known, one panel per variable (matplotlib, headless; torch-free).

FORECASTS is what ``timecma-serve-batch`` wrote in the wide format (a ``cutoff`` column, one column per
variable, ``{var}-lo-{level}``/``{var}-hi-{level}`` where intervals were asked for); INPUT the data it
was served from (parquet or CSV, wide).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from timecma.core.errors import EXIT_CODES_HELP, BackendUnavailable, InputError, WriteError, fail
from timecma.core.files import PNG_MARK, check_replaceable, is_marked_png, png_mark
from timecma.core.timestamps import arrow_timestamps

PROG = "timecma-plot"
log = logging.getLogger(__name__)
PLOT_MARK = PNG_MARK  # a PNG text chunk of every plot timecma-plot writes, its value PLOT_MARK_VALUE
PLOT_MARK_VALUE = "timecma-plot"
PLOT_OUTPUT = "a PNG written by timecma-plot"


def is_plot_output(path: str) -> bool:
    """What timecma-plot may replace: a PNG file it wrote (``PLOT_MARK`` in its text chunks), not a link."""
    return is_marked_png(path, PLOT_MARK_VALUE)


def check_out(out: str) -> None:
    """``--out`` must name a PNG and may hold nothing, an empty file, or a plot timecma-plot wrote; anything
    else is refused (InputError naming it) and left alone."""
    if not out.lower().endswith(".png"):
        raise InputError(f"--out {out} must name a .png file (timecma-plot writes PNG)")
    check_replaceable(out, is_plot_output, PLOT_OUTPUT)


def save_png(fig, out: str) -> None:
    """``fig`` as a marked PNG at ``out``, written to a temporary file beside it and renamed into place: the
    name holds the old file or the whole new one, never half a plot."""
    import matplotlib

    check_out(out)  # again: drawing took a while
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.tmp-{os.getpid()}-", suffix=".png",
                               dir=os.path.dirname(os.path.abspath(out)))
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110,
                        metadata={**png_mark(PLOT_MARK_VALUE), "Software": f"timecma-plot (matplotlib "
                                                                          f"{matplotlib.__version__})"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read(path: str) -> pa.Table:
    if not os.path.isfile(path):
        raise InputError(f"{path} does not exist")
    try:
        return pcsv.read_csv(path) if path.lower().endswith(".csv") else pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path} is not a readable parquet or CSV file: {exc}") from exc


def _times(col, name: str) -> np.ndarray:
    try:
        return arrow_timestamps(col)
    except (ValueError, TypeError) as exc:
        raise InputError(f"column {name!r} holds a value that is not a timestamp: {exc}") from exc


def levels_in(names: list[str], variable: str) -> list[int]:
    """Interval levels present for ``variable`` (both bounds), widest first."""
    lv = {int(n.rsplit("-", 1)[1]) for n in names if n.startswith(f"{variable}-lo-") and n.rsplit("-", 1)[1].isdigit()}
    return sorted((x for x in lv if f"{variable}-hi-{x}" in names), reverse=True)


def plot(forecasts: pa.Table, data: pa.Table, out: str, *, time_col: str, variables: list[str] | None = None,
         series: str | None = None, cutoffs: int = 3, history: int | None = None) -> dict:
    """Draw and save the PNG (``save_png``: only where nothing is, an empty file, or a plot of ours); returns
    what was drawn (series, variables, cutoffs)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BackendUnavailable("timecma-plot needs matplotlib: pip install 'timecma[plot]'") from exc
    names = forecasts.column_names
    if "cutoff" not in names:
        hint = " (long format: serve with --format wide to plot)" if "y_hat" in names else ""
        raise InputError(f"the forecasts have no 'cutoff' column{hint}; pass a timecma-serve-batch output")
    if time_col not in names or time_col not in data.column_names:
        raise InputError(f"time column {time_col!r} is missing from the forecasts or the data (--time-col)")
    sid_col = names[0] if names[0] != "cutoff" else None
    if sid_col is not None:
        ids = pc.unique(forecasts.column(sid_col)).to_pylist()
        chosen = series if series is not None else ids[0]
        match = [i for i in ids if str(i) == str(chosen)]
        if not match:
            raise InputError(f"series {chosen!r} is not in the forecasts (they hold {ids[:10]}...)")
        forecasts = forecasts.filter(pc.equal(forecasts.column(sid_col), match[0]))
        if sid_col in data.column_names:
            data = data.filter(pc.equal(data.column(sid_col).cast(forecasts.schema.field(sid_col).type), match[0]))
        chosen = match[0]
    else:
        chosen = None
    candidates = [c for c in names if c not in (sid_col, "cutoff", "step", time_col, "clamped_inputs")
                  and "-lo-" not in c and "-hi-" not in c]
    variables = variables or candidates[:4]
    bad = [v for v in variables if v not in candidates or v not in data.column_names]
    if bad:
        raise InputError(f"variable(s) {bad} are not in both the forecasts and the data (forecast variables: "
                         f"{candidates})")
    f_cut = _times(forecasts.column("cutoff"), "cutoff")
    cut = np.unique(f_cut)[-cutoffs:]
    f_ts = _times(forecasts.column(time_col), time_col)
    d_ts = _times(data.column(time_col), time_col)
    horizon = int((f_cut == cut[-1]).sum())
    history = history or 2 * horizon
    first = np.searchsorted(d_ts, cut[0])
    lo_i, hi_t = max(0, first - history + 1), f_ts[f_cut == cut[-1]].max()
    keep = np.arange(len(d_ts)) >= lo_i

    fig, axes = plt.subplots(len(variables), 1, figsize=(11, 2.6 * len(variables)), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, v in zip(axes[:, 0], variables):
        y = data.column(v).to_numpy(zero_copy_only=False).astype(float)
        past = keep & (d_ts <= cut[0])
        ax.plot(d_ts[past], y[past], color="0.2", lw=1.0, label="history")
        known = keep & (d_ts > cut[0]) & (d_ts <= hi_t)
        if known.any():
            ax.plot(d_ts[known], y[known], color="0.2", lw=1.0, ls=":", label="actual")
        for k, c in enumerate(cut):
            sel = f_cut == c
            color = colors[(k + 1) % len(colors)]
            for j, lv in enumerate(levels_in(names, v)):
                ax.fill_between(f_ts[sel], forecasts.column(f"{v}-lo-{lv}").to_numpy()[sel],
                                forecasts.column(f"{v}-hi-{lv}").to_numpy()[sel], color=color, alpha=0.12 + 0.1 * j,
                                lw=0, label=f"{lv}% interval" if k == len(cut) - 1 else None)
            ax.plot(f_ts[sel], forecasts.column(v).to_numpy()[sel], color=color, lw=1.4,
                    label=f"forecast from {np.datetime_as_string(c, unit='h')}")
            ax.axvline(c, color=color, lw=0.6, ls="--")
        ax.set_ylabel(v)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=3)
    axes[0, 0].set_title(f"timecma forecasts{f' of series {chosen!r}' if chosen is not None else ''}")
    fig.tight_layout()
    try:
        save_png(fig, out)
    except OSError as exc:
        raise WriteError(f"cannot write the plot {out}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)
    return {"series": chosen, "variables": variables, "cutoffs": [str(c) for c in cut]}


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.argument("forecasts_path", metavar="FORECASTS")
@click.option("--data", "data_path", required=True, help="The input the forecasts were served from (parquet or CSV).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="PNG to write: a new file, an empty one, or a plot timecma-plot wrote before (replaced); anything "
                   "else is refused.")
@click.option("--time-col", default="date", show_default=True)
@click.option("--variables", default=None, help="Comma-separated (default: the first four).")
@click.option("--series", default=None, help="Series id to draw (default: the first).")
@click.option("--cutoffs", default=3, show_default=True, type=click.IntRange(min=1), help="The last N cutoffs.")
@click.option("--history", default=None, type=click.IntRange(min=1),
              help="Rows of history before the first cutoff drawn (default: twice the horizon).")
def plot_cmd(forecasts_path, data_path, out, time_col, variables, series, cutoffs, history):
    """Draw history, forecasts (with their intervals) and actuals to a PNG."""
    try:
        check_out(out)  # before reading anything
        drawn = plot(_read(forecasts_path), _read(data_path), out, time_col=time_col,
                     variables=variables.split(",") if variables else None, series=series, cutoffs=cutoffs,
                     history=history)
    except (InputError, BackendUnavailable, WriteError) as exc:
        fail(PROG, exc, " (nothing written)")
    click.echo(f"timecma-plot: {', '.join(drawn['variables'])}, cutoffs {', '.join(drawn['cutoffs'])} -> {out}")
