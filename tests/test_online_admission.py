"""The endpoint's admission rules over a real socket (the app on uvicorn on 127.0.0.1, as `timecma-serve` runs
it, and as each Ray Serve replica runs it): bearer key, readiness, body size, concurrency, deadline, dynamic
batching, and the Prometheus metrics that count them."""

from __future__ import annotations

import http.client
import json
import threading
import time

import numpy as np
import pytest

from conftest import make_frame

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from timecma.runtime.serving.service import ForecastService, Limits  # noqa: E402
from timecma.runtime.serving.single_process import BackgroundServer  # noqa: E402

VARS = ["v0", "v1", "v2"]
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _body(seed: int = 5) -> bytes:
    win = make_frame(24, seed=seed)
    return json.dumps({"timestamps": [str(t) for t in win.date], "values": win[VARS].to_numpy().tolist()}).encode()


def _call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        raw = r.read()
        doc = json.loads(raw) if r.getheader("content-type", "").startswith("application/json") else raw.decode()
        return r.status, doc, {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def _samples(port: int) -> dict:
    status, text, _ = _call(port, "GET", "/metrics", headers=AUTH)
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture()
def endpoint(small_bundle, tmp_path, request):
    """The deadline is 0.3 s, or ``request.param`` (indirect parametrization)."""
    deadline_s = getattr(request, "param", 0.3)
    svc = ForecastService(str(small_bundle), backend="ort-cpu", store=str(tmp_path / "store"), warm_up="off",
                          api_key=KEY, limits=Limits(max_concurrent=1, max_body_bytes=20_000, deadline_s=deadline_s))
    with BackgroundServer(svc) as url:
        yield svc, int(url.rsplit(":", 1)[1])
    svc.close()


def test_key_readiness_and_size(endpoint):
    svc, port = endpoint
    status, doc, headers = _call(port, "GET", "/health")
    assert (status, doc, headers["retry-after"]) == (503, {"status": "starting"}, "1")  # open, not ready
    status, _, headers = _call(port, "POST", "/forecast", _body(), AUTH)
    assert status == 503 and headers["retry-after"] == "1"
    svc.warm_up()
    assert _call(port, "GET", "/health")[:2] == (200, {"status": "ok"})  # /health needs no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"authorization": f"Basic {KEY}"}):
        status, doc, extra = _call(port, "POST", "/forecast", _body(), headers)
        assert status == 401 and extra["www-authenticate"] == "Bearer" and KEY not in json.dumps(doc)
    assert _call(port, "GET", "/info")[0] == 401 and _call(port, "GET", "/metrics")[0] == 401
    status, out, _ = _call(port, "POST", "/forecast", _body(), {"authorization": f"bearer {KEY}"})
    assert status == 200 and np.array(out["forecast"]).shape == (12, 3)
    assert _call(port, "POST", "/forecast", _body(), AUTH)[1] == out  # the same window again: a store hit
    status, doc, _ = _call(port, "POST", "/forecast", b"x" * 20_001, AUTH)
    assert status == 413 and "20001 bytes" in doc["error"]
    status, info, _ = _call(port, "GET", "/info", headers=AUTH)
    assert status == 200 and KEY not in json.dumps(info)
    assert info["limits"] == {"max_concurrent": 1, "max_body_bytes": 20_000, "deadline_s": 0.3, "max_wait_ms": 2.0,
                              "max_batch_tokens": 16384, "max_batch_windows": 0}
    assert info["replica"]["pid"] > 0
    assert info["backend"]["name"] == "ort-cpu" and info["backend"]["llm_store_precision"] == "fp32"
    assert info["api_key_required"] and info["ready"] and info["llm"]["d_llm"] > 0
    m = _samples(port)
    assert m[("timecma_refusals_total", (("reason", "unauthorized"),))] == 6
    assert m[("timecma_refusals_total", (("reason", "starting"),))] == 2  # /health while starting, and /forecast
    assert m[("timecma_refusals_total", (("reason", "too_large"),))] == 1
    assert m[("timecma_requests_total", (("route", "/forecast"), ("status", "200")))] == 2
    assert m[("timecma_store_lookups_total", (("result", "miss"),))] == 3  # one prompt per variable, then hits
    assert m[("timecma_store_lookups_total", (("result", "hit"),))] == 3
    assert m[("timecma_window_hits_total", ())] == 1  # the repeat read its encoded prompts from the store
    assert m[("timecma_llm_calls_total", ())] >= 1
    assert m[("timecma_stage_seconds_count", (("stage", "llm"),))] == 2


@pytest.mark.parametrize("endpoint", [5.0], indirect=True)  # a deadline no loaded machine reaches by accident
def test_overload_is_refused_at_once_and_a_late_start_times_out(endpoint):
    """A second request while the only slot is held is a 429 at once (well within the 5 s deadline: it does not
    wait for the slot); the first, whose forecast cannot start, is a 504 at its deadline."""
    svc, port = endpoint
    svc.warm_up()
    results = {}
    svc.f._lock.acquire()  # the replica is busy with a forecast that takes longer than the deadline
    try:
        first = threading.Thread(target=lambda: results.update(first=_call(port, "POST", "/forecast", _body(), AUTH)))
        first.start()
        deadline = time.time() + 30
        while svc.metrics.in_flight._value.get() < 1:  # the first holds the only slot
            assert time.time() < deadline, "the first request was not admitted"
            time.sleep(0.01)
        t = time.perf_counter()
        status, doc, headers = _call(port, "POST", "/forecast", _body(), AUTH)
        assert status == 429 and headers["retry-after"] == "1" and time.perf_counter() - t < 2.5  # at once
        first.join(30)
    finally:
        svc.f._lock.release()
    assert results["first"][0] == 504 and "5 s" in results["first"][1]["error"]
    assert _call(port, "POST", "/forecast", _body(), AUTH)[0] == 200  # the slot and the turn are free again
    m = _samples(port)
    assert m[("timecma_refusals_total", (("reason", "overloaded"),))] == 1
    assert m[("timecma_refusals_total", (("reason", "deadline"),))] == 1
    assert m[("timecma_in_flight_requests", ())] == 0
    assert m[("timecma_requests_total", (("route", "/forecast"), ("status", "429")))] == 1


def test_deployment_bounds_its_queues_and_autoscales_on_depth():
    pytest.importorskip("ray")
    from timecma.core.errors import InputError
    from timecma.runtime.serving.ray_serve import deployment

    fixed = deployment(replicas=2, limits=Limits(max_concurrent=6))
    cfg = fixed._deployment_config
    assert cfg.num_replicas == 2 and cfg.autoscaling_config is None
    assert cfg.max_ongoing_requests == 12 and cfg.max_queued_requests == 6
    auto = deployment(replicas=(1, 4), limits=Limits(max_concurrent=6))._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 3)
    with pytest.raises(InputError, match="need 1 <= min <= max"):
        deployment(replicas=(3, 2))


def test_concurrent_requests_share_forecast_calls_and_get_their_batch_1_answers(small_bundle, tmp_path):
    """Dynamic batching: 8 clients at once, each a different window; each answer equals the window forecast alone
    (fp32 tolerance: 1e-5 of the forecast's scale), and some calls held more than one window."""
    from timecma.runtime import Forecaster

    svc = ForecastService(str(small_bundle), backend="ort-cpu", warm_up="now",
                          limits=Limits(max_concurrent=8, max_wait_ms=200, max_batch_tokens=600))
    bodies = [_body(seed) for seed in range(20, 28)]
    out: dict = {}
    go = threading.Barrier(8)
    with BackgroundServer(svc) as url:
        port = int(url.rsplit(":", 1)[1])

        def client(i):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.connect()
            go.wait()
            conn.request("POST", "/forecast", body=bodies[i])
            r = conn.getresponse()
            out[i] = (r.status, json.loads(r.read()))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        m = _samples(port)
    svc.close()
    alone = Forecaster.load(str(small_bundle), backend="ort-cpu")
    for i in range(8):
        status, doc = out[i]
        assert status == 200, doc
        y = alone.predict(make_frame(24, seed=20 + i))
        np.testing.assert_allclose(np.array(doc["forecast"]), y, rtol=0, atol=1e-5 * np.abs(y).max())
    calls, windows = m[("timecma_batch_windows_count", ())], m[("timecma_batch_windows_sum", ())]
    assert windows == 8 and calls < 8  # concurrent windows shared forecast calls
    assert m[("timecma_llm_calls_total", ())] >= 2  # 24 misses of ~230 tokens: the 600-token budget splits them


def test_a_lone_request_does_not_wait_for_company(small_bundle):
    """At one client the batch does not wait --max-wait-ms for requests that are not coming (it used to). The
    wait is 5 s, so that a loaded machine's slow request is still far from it."""
    svc = ForecastService(str(small_bundle), backend="ort-cpu", warm_up="now",
                          limits=Limits(max_concurrent=4, max_wait_ms=5000))
    with BackgroundServer(svc) as url:
        port = int(url.rsplit(":", 1)[1])
        assert _call(port, "POST", "/forecast", _body(3))[0] == 200
        t = time.perf_counter()
        for seed in range(30, 35):
            assert _call(port, "POST", "/forecast", _body(seed))[0] == 200
        assert (time.perf_counter() - t) / 5 < 2.5
        # and through the worker thread (the forecaster busy for a moment): no 5 s wait either
        svc.f._lock.acquire()
        threading.Timer(0.05, svc.f._lock.release).start()
        t = time.perf_counter()
        assert _call(port, "POST", "/forecast", _body(40))[0] == 200
        assert time.perf_counter() - t < 2.5
    svc.close()
