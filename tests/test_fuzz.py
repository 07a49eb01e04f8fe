"""Property-based inputs (hypothesis) for serving: whatever arrives, the outcome is a correct
forecast or an InputError that names the problem, with no partial output and no other
exception type. `make test` prints how many cases each property ran
(--hypothesis-show-statistics)."""

import os
from decimal import Decimal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from timecma.core.errors import InputError
from timecma.runtime import Forecaster
from timecma.runtime.serving.batch import BatchServer

SEQ, PRED, VARS = 24, 12, ["v0", "v1", "v2"]
FUZZ = settings(max_examples=int(os.environ.get("TIMECMA_FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def forecaster(small_bundle):
    f = Forecaster.load(str(small_bundle), backend="ort-cpu")
    yield f
    f.close()


# -- values and timestamps ------------------------------------------------------------------
magnitudes = st.sampled_from([1.0, 1e-30, 1e-6, 1e3, 1e12, 1e30, 1e300])
specials = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, 5e-324])


@st.composite
def windows(draw, rows=None, spread=9):
    """Most windows are valid; the rest break one thing (or several)."""
    broken = draw(st.integers(0, spread))  # 0-4 and 10+ are valid (hypothesis favours small integers)
    n = rows if rows is not None else (draw(st.sampled_from([0, 1, SEQ - 1, SEQ + 1])) if broken in (5, 9) else SEQ)
    scale = draw(magnitudes)
    vals = draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=n * 3, max_size=n * 3))
    values = np.array(vals, dtype=np.float64).reshape(n, 3) * scale + draw(st.floats(-1e3, 1e3)) * (scale <= 1e3)
    if n and broken in (6, 9):
        values[draw(st.integers(0, n - 1)), draw(st.integers(0, 2))] = draw(specials)
    start = np.datetime64("2021-03-01T00:00") + np.timedelta64(draw(st.integers(0, 10_000)), "h")
    ts = start + np.arange(n) * np.timedelta64(1, "h")
    fault = draw(st.sampled_from(["duplicate", "unsorted", "gap", "minutes"])) if broken in (7, 9) else "none"
    if n >= 3 and fault == "duplicate":
        ts[2] = ts[1]
    elif n >= 3 and fault == "unsorted":
        ts[[1, 2]] = ts[[2, 1]]
    elif n >= 3 and fault == "gap":
        ts[2:] += np.timedelta64(1, "h")
    elif n >= 3 and fault == "minutes":
        ts[1] += np.timedelta64(15, "m")
    return values, ts.astype("datetime64[ns]")


def _is_valid(values: np.ndarray, ts: np.ndarray) -> bool:
    if values.shape != (SEQ, 3) or not np.isfinite(values).all() or np.abs(values).max() > 3.4e38:
        return False
    steps = np.diff(ts.astype("datetime64[s]").astype(np.int64))
    return bool((steps == 3600).all())


def _outcome(call):
    """(result, None) or (None, InputError); any other exception fails the property."""
    try:
        result = call()
    except InputError as exc:
        assert str(exc), "an InputError must say what is wrong"
        event(f"InputError: {str(exc).split(':')[0][:40]}")
        return None, exc
    event("served")
    return result, None


@FUZZ
@given(w=windows())
def test_predict_on_random_arrays(forecaster, w):
    values, ts = w
    y, err = _outcome(lambda: forecaster.predict(values, ts))
    if y is not None:
        assert _is_valid(values, ts) and y.shape == (PRED, 3) and np.isfinite(y).all()
    else:  # refused: either the window is invalid, or its values give a forecast that is not finite / too long
        assert not _is_valid(values, ts) or np.abs(values).max() > 1e15 or "not finite" in str(err)


column_kinds = st.sampled_from(["float", "int", "bool", "str", "decimal", "object_mixed", "float32"])


@st.composite
def frames(draw):
    values, ts = draw(windows(rows=SEQ))
    cols = {}
    time_kind = ["naive", "tz", "iso_str", "naive", "garbage_str", "missing"][draw(st.integers(0, 5))]
    if time_kind == "naive":
        cols["date"] = pd.to_datetime(ts)
    elif time_kind == "tz":
        cols["date"] = pd.to_datetime(ts).tz_localize(draw(st.sampled_from(["UTC", "Europe/Paris", "Asia/Tokyo"])))
    elif time_kind == "iso_str":
        cols["date"] = [str(t) for t in ts]
    elif time_kind == "garbage_str":
        cols["date"] = ["not a time"] * SEQ
    kinds = {v: draw(column_kinds) if draw(st.integers(0, 5)) == 5 else "float" for v in VARS}
    for j, v in enumerate(VARS):
        col = values[:, j]
        k = kinds[v]
        make = {"float": lambda: col, "float32": lambda: col.astype(np.float32),
                "int": lambda: col.astype(np.int64) if np.isfinite(col).all() and np.abs(col).max() < 9e18 else col,
                "bool": lambda: col > 0, "str": lambda: col.astype(str),
                "decimal": lambda: [Decimal(str(float(x))) for x in col],
                "object_mixed": lambda: [float(x) if i % 2 else str(x) for i, x in enumerate(col)]}
        cols[v] = make[k]()
    layout = ["as_is", "shuffled", "as_is", "drop_var", "extra_col"][draw(st.integers(0, 4))]
    df = pd.DataFrame(cols)
    if layout == "drop_var":
        df = df.drop(columns=[draw(st.sampled_from(VARS))])
    elif layout == "extra_col":
        df["extra"] = 1.0
    elif layout == "shuffled":
        df = df[list(reversed(df.columns))]
    return df, values, ts, time_kind, kinds, layout


@FUZZ
@given(case=frames())
def test_predict_on_random_frames(forecaster, case):
    df, values, ts, time_kind, kinds, layout = case
    y, err = _outcome(lambda: forecaster.predict(df))
    accepted_types = all(k in ("float", "float32", "int", "decimal") for k in kinds.values())
    if y is not None:
        assert y.shape == (PRED, 3) and np.isfinite(y).all()
        assert accepted_types and layout in ("as_is", "shuffled") and time_kind in ("naive", "tz", "iso_str")
    else:
        assert (not accepted_types or layout in ("drop_var", "extra_col") or time_kind in ("garbage_str", "missing")
                or not _is_valid(values, ts) or np.abs(values).max() > 1e15 or "not finite" in str(err)), str(err)


# -- serve-batch on random parquet files ------------------------------------------------------
@st.composite
def parquet_inputs(draw):
    n_series = draw(st.integers(1, 3))
    frames_ = []
    for k in range(n_series):
        rows = [SEQ, 3 * SEQ, SEQ + 7, 0, 1, SEQ - 1][draw(st.integers(0, 5))]
        values, ts = draw(windows(rows=rows, spread=24))
        frames_.append(pd.DataFrame({"id": f"s{k}", "date": ts, "v0": values[:, 0], "v1": values[:, 1],
                                     "v2": values[:, 2]}))
    df = pd.concat(frames_, ignore_index=True)
    variant = ["plain", "tz", "plain", "string_col", "bool_col", "no_id", "empty"][draw(st.integers(0, 6))]
    if variant == "string_col":
        df["v1"] = df["v1"].astype(str)
    elif variant == "bool_col":
        df["v2"] = df["v2"] > 0
    elif variant == "tz" and len(df):
        df["date"] = pd.to_datetime(df["date"]).dt.tz_localize("UTC")
    elif variant == "no_id":
        df = df.drop(columns=["id"])
    elif variant == "empty":
        df = df.iloc[:0]
    mode = draw(st.sampled_from(["last", "rolling"]))
    return df, variant, mode


@FUZZ
@given(case=parquet_inputs())
def test_serve_batch_on_random_parquet(forecaster, tmp_path_factory, case):
    df, variant, mode = case
    d = tmp_path_factory.mktemp("fuzz")
    inp, out = d / "in.parquet", d / "out.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), inp)
    server = BatchServer(forecaster, "id", mode, stride=5, batch_windows=4)
    try:
        summary = server.run(str(inp), str(out), progress=False)
    except InputError as exc:
        assert str(exc)
        event(f"InputError: {str(exc).replace(str(d), '<dir>')[:40]}")
        assert not out.exists()  # nothing partial
    else:
        event(f"served {summary.windows} windows")
        table = pq.read_table(out)
        assert table.num_rows == summary.rows_written == summary.windows * PRED
        assert variant not in ("string_col", "bool_col", "no_id", "empty")
        got = table.to_pandas()
        assert np.isfinite(got[VARS].to_numpy()).all()
    assert sorted(os.listdir(d)) in (["in.parquet"], ["in.parquet", "out.parquet"])  # no temporaries


def test_timezone_aware_frames_are_read_in_utc(forecaster):
    """A zone-aware window gives the forecast of the same instants in UTC, as serve-batch reads them."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=(SEQ, 3)) * 10
    utc = pd.date_range("2021-05-01 00:00", periods=SEQ, freq="h")
    paris = utc.tz_localize("UTC").tz_convert("Europe/Paris")
    a = forecaster.predict(pd.DataFrame({"date": utc, **{v: values[:, j] for j, v in enumerate(VARS)}}))
    b = forecaster.predict(pd.DataFrame({"date": paris, **{v: values[:, j] for j, v in enumerate(VARS)}}))
    np.testing.assert_array_equal(a, b)
