"""The endpoint's admission rules on a plain replica object (what each Ray Serve replica runs): bearer key,
readiness, body size, concurrency, deadline, and the Prometheus metrics that count them."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from conftest import make_frame

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from timecma.runtime.serving.online import ForecastEndpoint, Limits  # noqa: E402

VARS = ["v0", "v1", "v2"]
KEY = "s3cret-key"


def _body(seed: int = 5) -> bytes:
    win = make_frame(24, seed=seed)
    return json.dumps({"timestamps": [str(t) for t in win.date], "values": win[VARS].to_numpy().tolist()}).encode()


def _samples(ep: ForecastEndpoint) -> dict:
    status, text, _ = ep.handle("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture()
def endpoint(small_bundle, tmp_path):
    ep = ForecastEndpoint(str(small_bundle), backend="ort-cpu", store=str(tmp_path / "store"), warm_up="off",
                          api_key=KEY,
                          limits=Limits(max_concurrent=1, max_body_bytes=20_000, deadline_s=0.3))
    return ep


def test_key_readiness_and_size(endpoint):
    ep, auth = endpoint, {"Authorization": f"Bearer {KEY}"}
    assert ep.handle("GET", "/health") == (503, {"status": "starting"}, {"Retry-After": "1"})  # open, not ready
    status, _, headers = ep.handle("POST", "/forecast", _body(), auth)
    assert status == 503 and headers["Retry-After"] == "1"
    ep.warm_up()
    assert ep.handle("GET", "/health")[:2] == (200, {"status": "ok"})  # /health needs no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"authorization": f"Basic {KEY}"}):
        status, doc, extra = ep.handle("POST", "/forecast", _body(), headers)
        assert status == 401 and extra == {"WWW-Authenticate": "Bearer"} and KEY not in json.dumps(doc)
    assert ep.handle("GET", "/info")[0] == 401 and ep.handle("GET", "/metrics")[0] == 401
    status, out, _ = ep.handle("POST", "/forecast", _body(), {"authorization": f"bearer {KEY}"})
    assert status == 200 and np.array(out["forecast"]).shape == (12, 3)
    assert ep.handle("POST", "/forecast", _body(), auth)[1] == out  # the same window again: a store hit
    status, doc, _ = ep.handle("POST", "/forecast", b"x" * 20_001, auth)
    assert status == 413 and "20001 bytes" in doc["error"]
    status, info, _ = ep.handle("GET", "/info", headers=auth)
    assert status == 200 and KEY not in json.dumps(info)
    assert info["limits"] == {"max_concurrent": 1, "max_body_bytes": 20_000, "deadline_s": 0.3, "max_wait_ms": 2.0,
                              "max_batch_tokens": 16384, "max_batch_windows": 0}
    assert info["replica"]["pid"] > 0
    assert info["backend"]["name"] == "ort-cpu" and info["backend"]["llm_store_precision"] == "fp32"
    assert info["api_key_required"] and info["ready"] and info["llm"]["d_llm"] > 0
    m = _samples(ep)
    assert m[("timecma_refusals_total", (("reason", "unauthorized"),))] == 6
    assert m[("timecma_refusals_total", (("reason", "starting"),))] == 1
    assert m[("timecma_refusals_total", (("reason", "too_large"),))] == 1
    assert m[("timecma_requests_total", (("route", "/forecast"), ("status", "200")))] == 2
    assert m[("timecma_store_lookups_total", (("result", "miss"),))] == 3  # one prompt per variable, then hits
    assert m[("timecma_store_lookups_total", (("result", "hit"),))] == 3
    assert m[("timecma_window_hits_total", ())] == 1  # the repeat read its encoded prompts from the store
    assert m[("timecma_llm_calls_total", ())] >= 1
    assert m[("timecma_stage_seconds_count", (("stage", "llm"),))] == 2


def test_overload_is_refused_at_once_and_a_late_start_times_out(endpoint):
    ep, auth = endpoint, {"Authorization": f"Bearer {KEY}"}
    ep.warm_up()
    results = {}
    ep.f._lock.acquire()  # the replica is busy with a forecast that takes longer than the deadline
    try:
        first = threading.Thread(target=lambda: results.update(first=ep.handle("POST", "/forecast", _body(), auth)))
        first.start()
        deadline = time.time() + 5
        while ep.metrics.in_flight._value.get() < 1 and time.time() < deadline:  # the first holds the only slot
            time.sleep(0.01)
        t = time.perf_counter()
        status, doc, headers = ep.handle("POST", "/forecast", _body(), auth)
        assert status == 429 and headers == {"Retry-After": "1"} and time.perf_counter() - t < 0.1  # at once
        first.join(5)
    finally:
        ep.f._lock.release()
    assert results["first"][0] == 504 and "0.3 s" in results["first"][1]["error"]
    assert ep.handle("POST", "/forecast", _body(), auth)[0] == 200  # the slot and the turn are free again
    m = _samples(ep)
    assert m[("timecma_refusals_total", (("reason", "overloaded"),))] == 1
    assert m[("timecma_refusals_total", (("reason", "deadline"),))] == 1
    assert m[("timecma_in_flight_requests", ())] == 0
    assert m[("timecma_requests_total", (("route", "/forecast"), ("status", "429")))] == 1


def test_deployment_bounds_its_queues_and_autoscales_on_depth():
    pytest.importorskip("ray")
    from timecma.core.errors import InputError
    from timecma.runtime.serving.online import deployment

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

    ep = ForecastEndpoint(str(small_bundle), backend="ort-cpu", warm_up="off",
                          limits=Limits(max_concurrent=8, max_wait_ms=200, max_batch_tokens=600))
    ep.warm_up()
    bodies = [_body(seed) for seed in range(20, 28)]
    out: dict = {}
    go = threading.Barrier(8)

    def client(i):
        go.wait()
        out[i] = ep.handle("POST", "/forecast", bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    alone = Forecaster.load(str(small_bundle), backend="ort-cpu")
    for i, body in enumerate(bodies):
        status, doc, _ = out[i]
        assert status == 200, doc
        win = make_frame(24, seed=20 + i)
        y = alone.predict(win)
        np.testing.assert_allclose(np.array(doc["forecast"]), y, rtol=0, atol=1e-5 * np.abs(y).max())
    m = _samples(ep)
    calls, windows = m[("timecma_batch_windows_count", ())], m[("timecma_batch_windows_sum", ())]
    assert windows == 8 and calls < 8  # concurrent windows shared forecast calls
    assert m[("timecma_llm_calls_total", ())] >= 2  # 24 misses of ~230 tokens: the 600-token budget splits them


def test_intervals_on_request(endpoint):
    """``"levels"`` in the body adds split-conformal bounds shaped like the forecast; a bad level is a 400."""
    ep, auth = endpoint, {"Authorization": f"Bearer {KEY}"}
    ep.warm_up()
    doc = json.loads(_body())
    status, out, _ = ep.handle("POST", "/forecast", json.dumps({**doc, "levels": [80, 95]}).encode(), auth)
    assert status == 200 and set(out["intervals"]) == {"80", "95"}
    y, lo80, hi95 = (np.array(a) for a in (out["forecast"], out["intervals"]["80"]["lo"], out["intervals"]["95"]["hi"]))
    assert lo80.shape == y.shape == (12, 3) and (lo80 <= y).all() and (y <= hi95).all()
    status, err, _ = ep.handle("POST", "/forecast", json.dumps({**doc, "levels": [100]}).encode(), auth)
    assert status == 400 and "outside 1..99" in err["error"]
    status, info, _ = ep.handle("GET", "/info", headers=auth)
    assert info["intervals"]["file"] == "calibration.npz" and "80" in info["intervals"]["test"]
