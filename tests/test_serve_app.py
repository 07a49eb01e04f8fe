"""The endpoint's one ASGI app over a real socket (uvicorn on 127.0.0.1, started by the test): today's API,
OpenAPI, the Open Inference Protocol v2 with the real ``tritonclient`` client, liveness vs readiness, and the
defects of issue 40 (chunked bodies read whole, Python errors escaping as 500, a batch exception ending the
forecasting thread, a non-loopback bind without a key), plus the forecaster <-> batch import cycle."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import make_frame, run_cli

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from timecma.runtime import Forecaster  # noqa: E402
from timecma.runtime.serving.service import ForecastService, Limits  # noqa: E402
from timecma.runtime.serving.single_process import BackgroundServer  # noqa: E402

VARS = ["v0", "v1", "v2"]
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def window(seed: int = 5):
    win = make_frame(24, seed=seed)
    return win, {"timestamps": [str(t) for t in win.date], "values": win[VARS].to_numpy().tolist()}


def body(seed: int = 5, **extra) -> bytes:
    return json.dumps({**window(seed)[1], **extra}).encode()


def call(port: int, method: str, path: str, data: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        raw = r.read()
        return r.status, dict(r.getheaders()), raw
    finally:
        conn.close()


def jcall(port, method, path, data=None, headers=None):
    status, hdrs, raw = call(port, method, path, data, headers)
    return status, json.loads(raw) if raw else None, hdrs


def wait_for(cond, timeout_s: float = 30.0, what: str = "the condition") -> None:
    """Poll ``cond()`` until true (an observable state, not a sleep that a loaded machine may outlast)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:g} s"
        time.sleep(0.005)


def arrays(seed: int = 5):
    win = window(seed)[0]
    return win[VARS].to_numpy(np.float64), win.date.to_numpy("datetime64[ns]")


def metric(port: int, name: str, labels: dict | None = None, headers=AUTH) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    status, _, raw = call(port, "GET", "/metrics", headers=headers)
    assert status == 200
    want = labels or {}
    return sum(s.value for fam in text_string_to_metric_families(raw.decode()) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in want.items()))


@pytest.fixture(scope="module")
def expected(small_bundle):
    with Forecaster.load(str(small_bundle), backend="ort-cpu") as f:
        yield {seed: f.predict(window(seed)[0]) for seed in (5, 6, 7)}


@pytest.fixture(scope="module")
def keyed(small_bundle, tmp_path_factory):
    """A warm server with a key and small limits, for the module."""
    svc = ForecastService(str(small_bundle), backend="ort-cpu", store=str(tmp_path_factory.mktemp("store")),
                          api_key=KEY, warm_up="now", limits=Limits(max_concurrent=2, max_body_bytes=20_000))
    with BackgroundServer(svc) as _:
        srv_port = int(_.rsplit(":", 1)[1])
        yield svc, srv_port
    svc.close()


def test_forecast_api_openapi_and_refusals(keyed, expected):
    svc, port = keyed
    assert jcall(port, "GET", "/health")[:2] == (200, {"status": "ok"})  # no key needed
    status, meta, _ = jcall(port, "GET", "/metadata", headers=AUTH)
    assert status == 200 and meta["variables"] == VARS and meta["seq_len"] == 24 and meta["pred_len"] == 12
    status, out, _ = jcall(port, "POST", "/forecast", body(5), {**AUTH, "Content-Type": "application/json"})
    assert status == 200 and out["variables"] == VARS
    np.testing.assert_allclose(np.array(out["forecast"]), expected[5], rtol=1e-5, atol=1e-5)
    win = window(5)[0]
    assert out["timestamps"][0] == str(win.date.iloc[-1] + np.timedelta64(1, "h")).replace(" ", "T")
    # records, a bare list of records, any content type (as before): the same answer
    recs = [{"date": str(t), **{v: float(x) for v, x in zip(VARS, row)}} for t, row in zip(win.date, win[VARS].values)]
    for doc, ctype in (({"records": recs}, "text/plain"), (recs, None)):
        status, again, _ = jcall(port, "POST", "/forecast", json.dumps(doc).encode(),
                                 {**AUTH, **({"Content-Type": ctype} if ctype else {})})
        assert status == 200 and again["forecast"] == out["forecast"]
    # intervals on request
    status, iv, _ = jcall(port, "POST", "/forecast", body(5, levels=[80, 95]), AUTH)
    assert status == 200 and set(iv["intervals"]) == {"80", "95"}
    y, lo, hi = (np.array(a) for a in (iv["forecast"], iv["intervals"]["80"]["lo"], iv["intervals"]["95"]["hi"]))
    assert lo.shape == y.shape == (12, 3) and (lo <= y).all() and (y <= hi).all()
    # bad input: 400 with a message naming the problem; the replica keeps serving
    bad_rec = [dict(r) for r in recs]
    bad_rec[3]["v1"] = "12"
    for bad, message in ((b"{not json", "not JSON"), (b'{"timestamps": []}', "'values' is missing"),
                         (json.dumps({"records": [{"date": "2020-01-01"}]}).encode(), "lacks variable"),
                         (json.dumps({"timestamps": ["x"] * 24, "values": [[1, 2, 3]] * 24}).encode(), "not ISO 8601"),
                         (json.dumps(bad_rec).encode(), "record 3 'v1' is '12'; a number is needed"),
                         (b"[1, 2]", "record 0: Input should be an object"), (b'"a string"', "JSON object or a list of records"),
                         (json.dumps({**window(5)[1], "values": [[True, 1, 2]] * 24}).encode(), "values[0][0]"),
                         (body(5, levels=[100]), "outside 1..99"),
                         (json.dumps({"timestamps": window(5)[1]["timestamps"][:5],
                                      "values": window(5)[1]["values"][:5]}).encode(), "needs 24 rows")):
        status, err, _ = jcall(port, "POST", "/forecast", bad, AUTH)
        assert status == 400 and message in err["error"], (bad[:60], err)
    assert jcall(port, "GET", "/forecast", headers=AUTH)[0] == 405
    assert jcall(port, "GET", "/nope", headers=AUTH)[0] == 404
    # the key: every route but the probes; never echoed
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        status, doc, hdrs = jcall(port, "POST", "/forecast", body(5), headers)
        assert status == 401 and hdrs.get("www-authenticate") == "Bearer" and KEY not in json.dumps(doc)
    assert jcall(port, "GET", "/info")[0] == 401 and jcall(port, "GET", "/metrics")[0] == 401
    assert jcall(port, "POST", "/forecast", body(5), {"authorization": f"bearer {KEY}"})[0] == 200
    status, info, _ = jcall(port, "GET", "/info", headers=AUTH)
    assert status == 200 and KEY not in json.dumps(info) and info["api_key_required"] and info["ready"]
    assert info["limits"]["max_body_bytes"] == 20_000 and info["backend"]["name"] == "ort-cpu"
    # OpenAPI and docs, open
    status, spec, _ = jcall(port, "GET", "/openapi.json")
    assert status == 200 and {"/forecast", "/v2/models/{model_name}/infer", "/v2/health/ready"} <= set(spec["paths"])
    assert "ForecastResponse" in spec["components"]["schemas"] and "HTTPBearer" in spec["components"]["securitySchemes"]
    assert call(port, "GET", "/docs")[0] == 200
    # every refusal above is counted, by reason
    assert metric(port, "timecma_refusals_total", {"reason": "unauthorized"}) >= 6
    assert metric(port, "timecma_refusals_total", {"reason": "bad_request"}) >= 10
    assert metric(port, "timecma_requests_total", {"route": "/forecast", "status": "200"}) >= 5
    assert metric(port, "timecma_window_hits_total") >= 1  # the same window again: its stored record


def test_body_limit_declared_and_chunked(keyed):
    """A declared Content-Length over the limit is refused unread; a chunked body (no length) is cut off as soon
    as it passes the limit: the server answers 413 before the body has ended (it used to read it whole)."""
    svc, port = keyed
    status, err, _ = jcall(port, "POST", "/forecast", b"x" * 20_001, AUTH)
    assert status == 413 and "20001 bytes" in err["error"]
    before = metric(port, "timecma_refusals_total", {"reason": "too_large"})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /forecast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n".encode())
        chunk = b"x" * 8000
        for _ in range(3):  # 24,000 bytes > 20,000; the body never ends (no terminating chunk)
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        s.settimeout(10)  # the old endpoint waited for the end of the body: this read timed out
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:100]
    assert metric(port, "timecma_refusals_total", {"reason": "too_large"}) == before + 1
    # a chunked body within the limit is read and served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = body(6)
    conn.request("POST", "/forecast", body=iter([data[:500], data[500:]]), headers={**AUTH}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 200 and len(json.loads(r.read())["forecast"]) == 12


@pytest.mark.parametrize("case", ["400-digit int", "5000-digit int", "nested 5000 deep", "nested 100 deep",
                                  "1e999", "NaN"])
def test_python_number_and_nesting_errors_are_400(keyed, case):
    """What used to escape as a 500 from ``int``/``float``/``json.loads`` (OverflowError, ValueError,
    RecursionError) is a 400, counted, on both protocols."""
    svc, port = keyed
    doc = window(7)[1]
    text = json.dumps(doc)
    first = json.dumps(doc["values"][0][0])
    patch = {"400-digit int": "1" * 400, "5000-digit int": "7" * 5000, "nested 5000 deep": "[" * 5000 + "]" * 5000,
             "nested 100 deep": "[" * 100 + "1" + "]" * 100, "1e999": "1e999", "NaN": "NaN"}[case]
    data = text.replace(first, patch, 1).encode()
    status, err, _ = jcall(port, "POST", "/forecast", data, AUTH)
    assert status == 400 and err["error"], err
    # the same number inside an Open Inference Protocol request
    inputs = [{"name": "values", "datatype": "FP64", "shape": [24, 3], "data": doc["values"]},
              {"name": "timestamps", "datatype": "BYTES", "shape": [24], "data": doc["timestamps"]}]
    oip = json.dumps({"inputs": inputs}).replace(first, patch, 1).encode()
    status, err, _ = jcall(port, "POST", f"/v2/models/{svc.model_name}/infer", oip, AUTH)
    assert status == 400 and err["error"], err
    assert metric(port, "timecma_requests_total", {"status": "500"}) == 0


def test_open_inference_protocol_with_tritonclient(keyed, expected):
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    svc, port = keyed
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(svc.model_name)
    meta = client.get_model_metadata(svc.model_name, headers=AUTH)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("values", "FP64", [24, 3]),
                                                                               ("timestamps", "BYTES", [24])]
    assert meta["outputs"][0] == {"name": "forecast", "datatype": "FP32", "shape": [12, 3]}
    win, doc = window(5)
    values = np.asarray(doc["values"], np.float64)
    for binary in (False, True):  # JSON tensors, and the binary tensor data extension (the client's default)
        v = httpclient.InferInput("values", [24, 3], "FP64")
        v.set_data_from_numpy(values, binary_data=binary)
        t = httpclient.InferInput("timestamps", [24], "BYTES")
        t.set_data_from_numpy(np.array(doc["timestamps"], dtype=object), binary_data=binary)
        outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("forecast", "forecast_timestamps")]
        res = client.infer(svc.model_name, [v, t], outputs=outs, headers=AUTH, request_id="r1")
        np.testing.assert_allclose(res.as_numpy("forecast"), expected[5], rtol=1e-5, atol=1e-5)
        stamps = [s.decode() if isinstance(s, bytes) else s for s in res.as_numpy("forecast_timestamps")]
        assert stamps[0] == str(win.date.iloc[-1] + np.timedelta64(1, "h")).replace(" ", "T")
        assert res.get_response()["id"] == "r1" and res.get_response()["model_name"] == svc.model_name
    # INT64 nanosecond timestamps, every output by default (binary), intervals by parameter
    t = httpclient.InferInput("timestamps", [24], "INT64")
    t.set_data_from_numpy(win.date.to_numpy().astype("datetime64[ns]").view(np.int64))
    v = httpclient.InferInput("values", [1, 24, 3], "FP64")
    v.set_data_from_numpy(values[None])
    res = client.infer(svc.model_name, [v, t], headers=AUTH, parameters={"levels": "80"})
    y = res.as_numpy("forecast")
    assert y.shape == (1, 12, 3)
    np.testing.assert_allclose(y[0], expected[5], rtol=1e-5, atol=1e-5)
    assert (res.as_numpy("lo-80") <= y).all() and (y <= res.as_numpy("hi-80")).all()
    # refusals: a wrong model, a missing input, no key
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("other", [v, t], headers=AUTH)
    with pytest.raises(InferenceServerException, match="timestamps"):
        client.infer(svc.model_name, [v], headers=AUTH)
    with pytest.raises(InferenceServerException, match="Bearer"):
        client.infer(svc.model_name, [v, t])
    client.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread ended on purpose
def test_liveness_readiness_and_a_failing_batch(small_bundle, tmp_path, expected):
    """Ready only after warm-up and while the forecasting thread lives; live while it lives. Bookkeeping (the
    metrics after a forecast) that raises, on the batcher's thread or on the idle fast path, is logged and
    counted, and the correct forecast is answered (it used to be a 500); a thread that ends anyway turns
    readiness and liveness off, and requests are refused at once, not at their deadline."""
    svc = ForecastService(str(small_bundle), backend="ort-cpu", store=str(tmp_path / "s"), warm_up="off",
                          limits=Limits(deadline_s=20))
    with BackgroundServer(svc) as url:
        port = int(url.rsplit(":", 1)[1])
        assert jcall(port, "GET", "/v2/health/live")[:2] == (200, {"live": True})
        status, doc, hdrs = jcall(port, "GET", "/v2/health/ready")
        assert (status, doc, hdrs.get("retry-after")) == (503, {"ready": False}, "1")
        assert jcall(port, "GET", "/health")[:2] == (503, {"status": "starting"})
        assert jcall(port, "POST", "/forecast", body(5))[0] == 503
        svc.warm_up()
        assert jcall(port, "GET", "/v2/health/ready")[:2] == (200, {"ready": True})
        assert jcall(port, "GET", f"/v2/models/{svc.model_name}/ready")[0] == 200

        fails = {"n": 2}
        observe = svc.batcher.on_batch

        def flaky(windows):
            if fails["n"]:
                fails["n"] -= 1
                raise RuntimeError("bookkeeping failed")
            observe(windows)

        svc.batcher.on_batch = flaky
        svc.f._lock.acquire()  # force the batcher's thread (not the idle fast path) to serve the next request
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/forecast", body=body(5))
            wait_for(lambda: svc.batcher._busy, what="the batcher taking the request")  # not the fast path
        finally:
            svc.f._lock.release()
        r = conn.getresponse()
        assert r.status == 200  # bookkeeping failed on the batcher's thread: the forecast is answered all the same
        np.testing.assert_allclose(np.array(json.loads(r.read())["forecast"]), expected[5], rtol=1e-5, atol=1e-5)
        assert svc.batcher.alive and svc.batcher.failed_batches == 0 and svc.batcher.failed_bookkeeping == 1
        status, out, _ = jcall(port, "POST", "/forecast", body(5))  # stored: the idle fast path, on the event loop
        assert status == 200  # its bookkeeping failed too: no 500
        np.testing.assert_allclose(np.array(out["forecast"]), expected[5], rtol=1e-5, atol=1e-5)
        assert svc.batcher.failed_bookkeeping == 2 and fails["n"] == 0
        assert metric(port, "timecma_bookkeeping_failures_total", headers={}) == 2
        assert metric(port, "timecma_failed_batches_total", headers={}) == 0
        assert metric(port, "timecma_requests_total", {"status": "500"}, headers={}) == 0

        def die(windows):
            raise SystemExit  # ends the thread (what no Exception handler catches)

        svc.batcher.on_batch = die
        svc.f._lock.acquire()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/forecast", body=body(6))
            wait_for(lambda: svc.batcher._busy, what="the batcher taking the request")
        finally:
            svc.f._lock.release()
        conn.getresponse().read()
        deadline = time.time() + 10
        while svc.batcher.alive and time.time() < deadline:
            time.sleep(0.05)
        assert not svc.batcher.alive
        t = time.perf_counter()
        status, err, _ = jcall(port, "POST", "/forecast", body(7))
        assert status == 503 and "stopped" in err["error"] and time.perf_counter() - t < 5  # not the 20 s deadline
        assert jcall(port, "GET", "/health")[:2] == (503, {"status": "stopped"})
        assert jcall(port, "GET", "/v2/health/ready")[0] == 503 and jcall(port, "GET", "/v2/health/live")[0] == 503
        assert metric(port, "timecma_ready", headers={}) == 0
    svc.close()


def test_concurrent_bookkeeping_is_one_step(small_bundle, tmp_path, monkeypatch):
    """``_observe_batch`` runs on the batcher's thread and on the event loop's (the idle fast path) at once: a
    call that overtakes another between its snapshot and its assignment used to leave a stale snapshot, then a
    negative difference, and ``Counter.inc`` raised ValueError (a correct forecast answered with an error)."""
    from timecma.runtime.serving import service as service_mod

    svc = ForecastService(str(small_bundle), backend="ort-cpu", store=str(tmp_path / "s"), warm_up="off")
    try:
        real, other = service_mod.snapshot, {}

        def overtaken(stats):
            out = real(stats)
            if not other:  # the first call, between its snapshot and its assignment: the forecaster goes on and
                svc.f.stats.hits += 5  # the other thread observes that
                other["t"] = threading.Thread(target=svc._observe_batch, args=(1,))
                other["t"].start()
                other["t"].join(0.5)  # under the lock it waits for this call to finish
            return out

        monkeypatch.setattr(service_mod, "snapshot", overtaken)
        start = svc.f.stats.hits
        svc._observe_batch(1)
        other["t"].join(10)
        svc.f.stats.hits += 1
        svc._observe_batch(1)  # without the lock: 1 hit against the other call's snapshot, a ValueError
        assert svc.metrics._hit._value.get() == svc.f.stats.hits - start == 6
        assert svc.metrics.batch_windows._sum.get() == 3
    finally:
        svc.close()


def test_close_lets_the_running_batch_finish_and_answers_the_queued(small_bundle, tmp_path, expected):
    """Shutdown with a batch in flight: the queued request is answered at once (stopped), the running batch
    finishes with its forecast, and only then are the engines and the store closed (they used to be closed
    under it, and a queued request waited for its deadline)."""
    from timecma.runtime.serving.batcher import BatcherStopped

    svc = ForecastService(str(small_bundle), backend="ort-cpu", store=str(tmp_path / "s"), warm_up="now")
    out: dict = {}

    def ask(name, seed):
        try:
            out[name] = svc.batcher.submit(*arrays(seed), timeout_s=60)
        except BaseException as exc:  # noqa: BLE001
            out[name] = exc

    svc.f._lock.acquire()  # the running batch is slow: it waits for the forecaster
    running = threading.Thread(target=ask, args=("running", 5))
    queued = threading.Thread(target=ask, args=("queued", 6))
    closer = threading.Thread(target=svc.close, kwargs={"timeout_s": 0.2})
    try:
        running.start()
        wait_for(lambda: svc.batcher._busy, what="the batch starting")
        queued.start()
        wait_for(lambda: svc.batcher._q.qsize() == 1, what="the second request queueing")
        closer.start()
        queued.join(30)
        assert isinstance(out.get("queued"), BatcherStopped)  # answered at once, not at its 60 s deadline
        assert not svc.batcher.alive and "running" not in out
        closer.join(0.3)
        assert closer.is_alive()  # close() waits for the batch: the engines and the store are still open
        with pytest.raises(BatcherStopped):
            svc.batcher.submit(*arrays(7), timeout_s=60)  # refused once stopped
    finally:
        svc.f._lock.release()
    running.join(30)
    closer.join(30)
    assert not closer.is_alive() and not svc.batcher._thread.is_alive()
    assert isinstance(out["running"], np.ndarray), out["running"]
    np.testing.assert_allclose(out["running"], expected[5], rtol=1e-5, atol=1e-5)


def _imports(path) -> list[tuple[str, bool]]:
    """(module imported, under ``if TYPE_CHECKING``) for every import in a file, functions' included."""
    import ast

    tree = ast.parse(open(path).read())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            typing_only |= {id(n) for b in node.body for n in ast.walk(b)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.append(("." * node.level + (node.module or ""), id(node) in typing_only))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in typing_only) for a in node.names]
    return out


def test_forecaster_does_not_import_the_batch_server():
    """The cycle is gone: ``forecaster`` never imports ``batch`` (``Forecaster.backtest`` calls ``frame_backtest``,
    which drives the batch server), and ``batch`` names the forecaster for type hints only."""
    from pathlib import Path

    import timecma.runtime.serving as package

    serving = Path(package.__file__).parent
    assert not [m for m, _ in _imports(serving / "forecaster.py") if m.endswith("batch")]
    assert all(typing for m, typing in _imports(serving / "batch.py") if m.endswith("forecaster"))
    assert (".batch", False) in _imports(serving / "frame_backtest.py")


def test_cli_single_process_and_help(small_bundle, tmp_path):
    """``timecma-serve`` (no --ray) serves in one process; SIGINT stops it cleanly; --help names both modes."""
    r = run_cli("timecma.runtime.serving.serve_cli:serve_cmd", "--help")
    assert r.returncode == 0 and "one process on uvicorn" in r.stdout and "--ray [ADDR]" in r.stdout
    assert "HAProxy" in r.stdout and "5.7 ms" in r.stdout
    r = run_cli("timecma.runtime.serving.serve_cli:serve_cmd", "--bundle", str(small_bundle), "--replicas", "2")
    assert r.returncode == 2 and "need(s) --ray" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from timecma.runtime.serving.serve_cli import serve_cmd; serve_cmd()", "--bundle",
           str(small_bundle), "--backend", "ort-cpu", "--port", str(port), "--store", str(tmp_path / "store")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if call(port, "GET", "/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        assert jcall(port, "POST", "/forecast", body(5))[0] == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "in one process at http://127.0.0.1" in out and "WARNING" not in err  # loopback: no key warning


def test_non_loopback_bind_without_a_key_warns(tmp_path):
    """Checked before anything listens (the bundle here does not exist, so nothing binds)."""
    r = run_cli("timecma.runtime.serving.serve_cli:serve_cmd", "--bundle", str(tmp_path / "none"), "--host",
                "0.0.0.0")
    assert r.returncode == 3 and "listening on 0.0.0.0" in r.stderr and "--api-key" in r.stderr
    r = run_cli("timecma.runtime.serving.serve_cli:serve_cmd", "--bundle", str(tmp_path / "none"), "--host",
                "0.0.0.0", "--api-key", "k")
    assert r.returncode == 3 and "listening on" not in r.stderr


def test_ray_latency_settings_and_their_fallback_without_haproxy(tmp_path, monkeypatch, caplog):
    """--ray-proxy auto sets RAY_SERVE_ENABLE_HA_PROXY / RAY_SERVE_THROUGHPUT_OPTIMIZED where an HAProxy binary is
    found, and falls back to Ray Serve's own proxy with a warning where none is; --ray-proxy haproxy refuses."""
    from timecma.core.errors import BackendUnavailable
    from timecma.runtime.serving.ray_serve import LATENCY_ENV, proxy_env

    fake = tmp_path / "haproxy"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(fake))
    env, line = proxy_env("auto")
    assert env == {**LATENCY_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH": str(fake)} and "HAProxy" in line
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "missing"))
    with caplog.at_level("WARNING"):
        env, line = proxy_env("auto")
    assert env == {} and "own proxy" in line and "no HAProxy binary" in caplog.text
    with pytest.raises(BackendUnavailable, match="no HAProxy binary"):
        proxy_env("haproxy")
    assert proxy_env("ray")[0] == {}
