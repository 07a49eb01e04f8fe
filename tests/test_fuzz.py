"""Property-based inputs (hypothesis) for serving: whatever arrives, the outcome is a correct
forecast or an InputError that names the problem, with no partial output and no other
exception type. `make test` prints how many cases each property ran
(--hypothesis-show-statistics)."""

import json
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


# -- the HTTP endpoint: raw bodies, content types and headers through a real socket ------------------------
HTTP_FUZZ = settings(max_examples=int(os.environ.get("TIMECMA_HTTP_FUZZ_EXAMPLES", "150")), deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HTTP_KEY = "fuzz-key"
HTTP_LIMIT = 8192
PATHS = ["/forecast", "/v2/models/timecma/infer", "/v2/models/other/infer", "/health", "/metadata", "/info",
         "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/timecma", "/v2/models/timecma/ready", "/nope",
         "/forecast/", "/v2/models/%00/infer", "/openapi.json"]
# what may appear in place of a number: what used to escape as a 500 (OverflowError, ValueError, RecursionError)
PATCHES = ["1" * 400, "7" * 5000, "[" * 3000 + "]" * 3000, "[" * 60 + "1" + "]" * 60, "1e999", "-1e999", "NaN",
           "-Infinity", "null", "true", '"12"', '"\\ud800"', "{}", "[]", "1.5e308", "-0", "9" * 30, '"' + "x" * 300 + '"']
# headers that change HTTP framing or the protocol are the HTTP server's, never the app's: not varied here
FRAMING = {"content-length", "transfer-encoding", "host", "connection", "upgrade", "expect", "te", "trailer",
           "keep-alive", "http2-settings"}


def _valid_docs() -> list[dict]:
    values, ts = np.random.default_rng(1).normal(size=(SEQ, 3)) * 10, np.datetime64("2021-03-01T00:00") + \
        np.arange(SEQ) * np.timedelta64(1, "h")
    stamps = [str(t) for t in ts]
    window = {"timestamps": stamps, "values": np.round(values, 3).tolist()}
    records = [{"date": t, **{v: float(x) for v, x in zip(VARS, row)}} for t, row in zip(stamps, np.round(values, 3))]
    oip = {"inputs": [{"name": "values", "datatype": "FP64", "shape": [SEQ, 3], "data": np.round(values, 3).tolist()},
                      {"name": "timestamps", "datatype": "BYTES", "shape": [SEQ], "data": stamps}]}
    return [window, {"records": records, "levels": [80]}, records, oip]


@st.composite
def http_bodies(draw):
    kind = draw(st.sampled_from(["valid", "patched", "mutated", "bytes", "text", "empty", "large"]))
    doc = draw(st.sampled_from(_valid_docs()))
    text = json.dumps(doc)
    if kind == "valid":
        return text.encode()
    if kind == "patched":  # one number (or string) replaced by something Python's own parsers choke on
        import re

        tokens = list(re.finditer(r"-?\d+\.\d+|\"2021[^\"]*\"|\b\d+\b", text))
        m = tokens[draw(st.integers(0, len(tokens) - 1))]
        return (text[:m.start()] + draw(st.sampled_from(PATCHES)) + text[m.end():]).encode()
    if kind == "mutated":  # the structure: a key dropped, renamed, a value swapped for another JSON value
        leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=False),
                         st.text(max_size=20))
        value = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=4), max_leaves=10)
        if isinstance(doc, dict) and doc:
            key = draw(st.sampled_from(sorted(doc)))
            op = draw(st.sampled_from(["drop", "swap", "rename"]))
            doc = dict(doc)
            if op == "drop":
                doc.pop(key)
            elif op == "swap":
                doc[key] = draw(value)
            else:
                doc[key + "x"] = doc.pop(key)
        else:
            doc = draw(value)
        return json.dumps(doc).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    if kind == "large":
        return b" " * draw(st.sampled_from([HTTP_LIMIT - 1, HTTP_LIMIT + 1, 3 * HTTP_LIMIT])) + text.encode()
    return b""


header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789", min_size=1, max_size=20).filter(
    lambda n: n.lower() not in FRAMING)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@st.composite
def http_requests(draw):
    headers = {}
    ctype = draw(st.sampled_from([None, "application/json", "text/plain", "application/octet-stream",
                                  "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                  "application/json; charset=latin-1", "application/vnd.api+json", "*/*", "json"]))
    if ctype:
        headers["Content-Type"] = ctype
    auth = draw(st.sampled_from(["key"] * 7 + ["none", "wrong", "basic", "junk"]))
    headers.update({"key": {"Authorization": f"Bearer {HTTP_KEY}"}, "none": {},
                    "wrong": {"Authorization": "Bearer nope"}, "basic": {"Authorization": f"Basic {HTTP_KEY}"},
                    "junk": {"Authorization": draw(header_values)}}[auth])
    for name, value in draw(st.dictionaries(header_names, header_values, max_size=3)).items():
        headers[name] = value
    special = draw(st.sampled_from([None, None, None, "Inference-Header-Content-Length", "Content-Encoding", "Accept"]))
    if special:
        headers[special] = draw(st.sampled_from(["0", "10", "99999999", "-1", "abc", "gzip", "identity", "*/*"]))
    target = draw(st.sampled_from(["forecast", "forecast", "forecast", "infer", "infer", "any"]))
    if target == "any":
        method, path = draw(st.sampled_from(["POST", "GET", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD"])), \
            draw(st.sampled_from(PATHS))
    else:  # mostly what reaches the parsers
        method = draw(st.sampled_from(["POST"] * 9 + ["GET"]))
        path = "/forecast" if target == "forecast" else "/v2/models/timecma/infer"
    return {"method": method, "path": path, "body": draw(http_bodies()), "headers": headers,
            "chunked": draw(st.booleans())}


@pytest.fixture(scope="module")
def http_endpoint(small_bundle, tmp_path_factory):
    pytest.importorskip("fastapi")
    from timecma.runtime.serving.service import ForecastService, Limits
    from timecma.runtime.serving.single_process import BackgroundServer

    svc = ForecastService(str(small_bundle), backend="ort-cpu", store=str(tmp_path_factory.mktemp("http-store")),
                          api_key=HTTP_KEY, warm_up="now",
                          limits=Limits(max_concurrent=2, max_body_bytes=HTTP_LIMIT, deadline_s=20))
    with BackgroundServer(svc) as url:
        yield svc, int(url.rsplit(":", 1)[1])
    svc.close()


def _refusals(port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {HTTP_KEY}"})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "timecma_refusals_total")


@HTTP_FUZZ
@given(req=http_requests())
def test_http_endpoint_on_random_requests(http_endpoint, req):
    """Whatever arrives over the socket: never a 5xx but the 503/504 the design gives, and every refusal (4xx or
    5xx) counted once in /metrics."""
    import http.client

    svc, port = http_endpoint
    before = _refusals(port)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = req["body"]
    try:
        if req["chunked"] and body:
            conn.request(req["method"], req["path"], body=iter([body[:len(body) // 2], body[len(body) // 2:]]),
                         headers=req["headers"], encode_chunked=True)
        else:
            conn.request(req["method"], req["path"], body=body, headers=req["headers"])
        r = conn.getresponse()
        r.read()
        status = r.status
    finally:
        conn.close()
    event(f"{req['method']} {status}")
    assert status < 500 or status in (503, 504), (status, req["method"], req["path"], req["headers"], body[:200])
    assert _refusals(port) - before == (1 if status >= 400 else 0), (status, req["path"])
