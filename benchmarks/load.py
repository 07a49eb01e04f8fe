"""Closed-loop load on ``timecma-serve`` over loopback (issue 24): throughput and latency against 1-32
concurrent clients with dynamic batching on and off, store misses and hits; overload past
``--max-concurrent``; two replicas with one SIGKILLed mid-run.

    python -m benchmarks.load --bundle runs/demo/etth1/bundle --out benchmarks/results/load-demo

Each client holds one kept-alive connection and sends its next request when the previous one is
answered (closed loop). A miss request is a window no request sent before (successive ETTh1 windows,
shifted by a constant after the data runs out), so each of its N prompts misses the store; a hit
request repeats one of a few windows sent once before the clock starts. Every run is bounded in time;
a request still in flight at the end is waited for and counted. The Ray cluster and each deployment
start before the clock starts.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import click
import numpy as np
import pyarrow.csv as pcsv

from timecma.core.manifest import read_manifest

from .machine import machine_info

HOST = "127.0.0.1"


class Windows:
    """Request bodies: ``fresh()`` a window never sent before, ``repeat(k)`` one of a fixed few."""

    def __init__(self, data: str, time_col: str, variables: list[str], seq_len: int, start_row: int = 0):
        t = pcsv.read_csv(data, convert_options=pcsv.ConvertOptions(timestamp_parsers=["%Y-%m-%d %H:%M:%S"]))
        self.values = np.stack([t.column(v).to_numpy().astype(float) for v in variables], axis=1)[start_row:]
        self.stamps = [str(s) for s in t.column(time_col).to_numpy().astype("datetime64[s]")[start_row:]]
        self.seq_len = seq_len
        self.span = len(self.values) - seq_len
        self._next = itertools.count()
        self._lock = threading.Lock()

    def body(self, i: int) -> bytes:
        """Window i: rows i..i+seq_len (mod the data), values shifted by 0.5 per pass so no two are alike."""
        start, shift = i % self.span, 0.5 * (i // self.span)
        rows = self.values[start:start + self.seq_len] + shift
        return json.dumps({"timestamps": self.stamps[start:start + self.seq_len],
                           "values": np.round(rows, 4).tolist()}).encode()

    def fresh(self) -> bytes:
        with self._lock:
            i = next(self._next)
        return self.body(i)

    def repeat(self, k: int) -> bytes:
        return self.body(self.span - 1 - k)  # the data's last windows: far from what fresh() reaches first


@dataclass
class Record:
    start: float
    end: float
    status: str  # "200", "429", ... or "error:<exception type>" (a dropped connection, a timeout)


@dataclass
class Load:
    """What a closed-loop run saw: one record per request, the wall time of the run."""

    records: list[Record] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict:
        ok = [r for r in self.records if r.status.startswith("2")]
        lat = np.array([r.end - r.start for r in ok]) * 1e3
        statuses: dict[str, int] = {}
        for r in self.records:
            statuses[r.status] = statuses.get(r.status, 0) + 1
        return {"requests": len(self.records), "ok": len(ok), "statuses": statuses, "wall_s": self.wall_s,
                "throughput_rps": len(ok) / self.wall_s if self.wall_s else 0.0,
                "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None}


def closed_loop(port: int, next_body: Callable[[], bytes], clients: int, duration_s: float,
                headers: dict | None = None, backoff_s: float = 0.1, timeout_s: float = 120.0,
                during: Callable[[float], None] | None = None) -> Load:
    """``clients`` threads, each POSTing /forecast on its own connection until ``duration_s`` is up.

    A refused request (429/503) is followed by ``backoff_s`` of quiet (well-behaved clients back off; the
    server's Retry-After of 1 s would hide the refusal path's speed). ``during(t0)`` runs on the calling
    thread while the clients run (e.g. to kill a replica)."""
    load, lock = Load(), threading.Lock()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    t0 = time.perf_counter()
    stop = t0 + duration_s

    def client():
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
        while time.perf_counter() < stop:
            body = next_body()
            s = time.perf_counter()
            try:
                conn.request("POST", "/forecast", body=body, headers=hdrs)
                r = conn.getresponse()
                r.read()
                status = str(r.status)
            except Exception as exc:  # noqa: BLE001 (a failure to count, then a new connection)
                status = f"error:{type(exc).__name__}"
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
            with lock:
                load.records.append(Record(s - t0, time.perf_counter() - t0, status))
            if status in ("429", "503"):
                time.sleep(backoff_s)
        conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    if during is not None:
        during(t0)
    for t in threads:
        t.join()
    load.wall_s = time.perf_counter() - t0
    return load


def post(port: int, body: bytes) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    conn.request("POST", "/forecast", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    return r.status


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def replica_pids(port: int, expected: int, timeout_s: float = 90.0) -> set[int]:
    """The process ids of the replicas serving now, from ``/info`` (routed to a random replica each time),
    asked until ``expected`` distinct ones answered or ``timeout_s`` passed (a replacement may be starting)."""
    deadline, pids, seen = time.monotonic() + timeout_s, set(), 0
    while time.monotonic() < deadline:
        status, doc = get(port, "/info")
        if status == 200:
            pids.add(doc["replica"]["pid"])
        seen += 1
        if len(pids) >= expected and seen >= 8:
            break
        time.sleep(0.05 if len(pids) < expected else 0)
    return pids


def recovery(load: Load, kill_at: float, level: float = 0.9) -> dict:
    """Throughput before the kill (after the first 2 s of ramp), and seconds from the kill until throughput,
    averaged over a span holding about 5 requests at that rate, is back to ``level`` of it."""
    ends = np.array([r.end for r in load.records if r.status.startswith("2")])
    rate = np.histogram(ends, np.arange(0.0, load.wall_s + 1.0, 1.0))[0].astype(float)  # per 1 s bin
    failed = [r for r in load.records if not r.status.startswith("2")]
    return {**time_to_recover(rate.tolist(), kill_at, level), "rate_per_bin": rate.tolist(), "failed": len(failed),
            "failed_statuses": sorted({r.status for r in failed}),
            "failed_within_s_of_kill": max((r.end - kill_at for r in failed), default=None)}


def time_to_recover(rate: list[float], kill_at: float, level: float = 0.9) -> dict:
    """From requests per 1 s bin: the pre-kill rate, and the first second after the kill from which a span of
    ``ceil(5 / rate)`` bins averages at least ``level`` of it (None: not within the run)."""
    r = np.asarray(rate, dtype=float)
    k = int(np.ceil(kill_at))
    base = float(r[2:int(kill_at)].mean()) if kill_at > 3 else 0.0
    span = max(1, int(np.ceil(5.0 / base))) if base > 0 else 1
    back = next((float(max(0.0, i - kill_at)) for i in range(k, len(r) - span + 1) if r[i:i + span].mean() >= level * base),
                None)
    return {"throughput_before_rps": base, "seconds_to_full_throughput": back, "recovery_span_s": span}


def deploy(bundle: str, port: int, store: str, *, replicas: int, cpus: float, backend: str, limits) -> None:
    from timecma.runtime.serving.online import start

    start(bundle, port=port, replicas=replicas, backend=backend, store=store, cpus_per_replica=cpus, limits=limits)


def sweep(bundle: str, windows: Windows, port: int, work: str, *, backend: str, cpus: float, levels: list[int],
          duration_s: float, batching: bool, hit_windows: int = 8) -> list[dict]:
    """One replica; every client count, misses then hits."""
    from ray import serve

    from timecma.runtime.serving.online import Limits

    top = max(levels)
    limits = Limits(max_concurrent=top, max_batch_windows=0 if batching else 1, deadline_s=600.0)
    deploy(bundle, port, os.path.join(work, f"store-{int(batching)}"), replicas=1, cpus=cpus, backend=backend,
           limits=limits)
    rows = []
    try:
        be = get(port, "/info")[1]["backend"]
        served = f"{be['name']} ({', '.join(f'{g} {p}' for g, p in be['precision'].items())})"
        for k in range(hit_windows):  # into the store before any clock
            if post(port, windows.repeat(k)) != 200:
                raise RuntimeError(f"warming request {k} was refused")
        for phase in ("miss", "hit"):
            for c in levels:
                nxt = windows.fresh if phase == "miss" else (lambda it=itertools.count(): windows.repeat(
                    next(it) % hit_windows))
                s = closed_loop(port, nxt, c, duration_s).summary()
                s.update(batching=batching, store=phase, clients=c, served_by=served)
                rows.append(s)
                click.echo(f"batching {'on ' if batching else 'off'} {phase:4s} {c:3d} clients: "
                           f"{s['throughput_rps']:7.1f} req/s  p50 {s['p50_ms']:8.1f} ms  p99 {s['p99_ms']:8.1f} ms  "
                           f"{s['statuses']}")
    finally:
        serve.delete("timecma")
    return rows


def overload(bundle: str, windows: Windows, port: int, work: str, *, backend: str, cpus: float, clients: int,
             max_concurrent: int, duration_s: float) -> dict:
    """More clients than ``max_concurrent``: every request gets 2xx or 429/503, none is dropped or hangs."""
    from ray import serve

    from timecma.runtime.serving.online import Limits

    deploy(bundle, port, os.path.join(work, "store-overload"), replicas=1, cpus=cpus, backend=backend,
           limits=Limits(max_concurrent=max_concurrent))
    try:
        load = closed_loop(port, windows.fresh, clients, duration_s)
    finally:
        serve.delete("timecma")
    s = load.summary()
    refused = [r.end - r.start for r in load.records if r.status in ("429", "503")]
    s.update(clients=clients, max_concurrent=max_concurrent,
             refusal_p50_ms=float(np.percentile(refused, 50) * 1e3) if refused else None,
             refusal_p99_ms=float(np.percentile(refused, 99) * 1e3) if refused else None,
             unanswered=sum(r.status.startswith("error") for r in load.records))
    click.echo(f"overload {clients} clients, max-concurrent {max_concurrent}: {s['statuses']}, "
               f"refusal p99 {s['refusal_p99_ms']} ms")
    return s


def replica_kill(bundle: str, windows: Windows, port: int, work: str, *, backend: str, clients: int,
                 max_concurrent: int, duration_s: float, kill_at: float) -> dict:
    """Two replicas of 1 CPU; one SIGKILLed at ``kill_at`` s; failures and the time to full throughput."""
    from ray import serve

    from timecma.runtime.serving.online import Limits

    deploy(bundle, port, os.path.join(work, "store-kill"), replicas=2, cpus=1.0, backend=backend,
           limits=Limits(max_concurrent=max_concurrent))
    pids = replica_pids(port, 2)
    victim = min(pids)
    killed: dict = {}

    def kill(t0):
        time.sleep(max(0.0, t0 + kill_at - time.perf_counter()))
        os.kill(victim, signal.SIGKILL)
        killed["at"] = time.perf_counter() - t0

    try:
        load = closed_loop(port, windows.fresh, clients, duration_s, during=kill)
        after = replica_pids(port, 2)
    finally:
        serve.delete("timecma")
    s = load.summary()
    s.update(recovery(load, killed["at"]), clients=clients, max_concurrent=max_concurrent, killed_at_s=killed["at"],
             replicas_before=sorted(pids), replicas_after=sorted(after))
    click.echo(f"replica kill at {killed['at']:.1f} s: {s['failed']} failed {s['failed_statuses']}, "
               f"full throughput again after {s['seconds_to_full_throughput']} s")
    return s


def markdown(res: dict) -> str:
    mi = res["machine"]
    lines = [f"# timecma-serve under load ({mi['date']})", "",
             f"{mi['cpu']}, {mi['cores']} cores, ISA {', '.join(mi['isa'])}; Ray {res['ray']}, local cluster; "
             f"loopback HTTP; clients in the same machine (they share its cores). Bundle: {res['bundle']}; "
             f"backend `{res['backend']}`: {res['sweep'][0].get('served_by', '?')}.", "",
             f"## Closed loop, one replica ({res['cpus']:g} CPUs), {res['duration_s']:g} s per row", "",
             "Batching on: windows that arrive within max-wait-ms share a forecast call (their misses one LLM "
             "call under the token budget); off: one window per call (`--max-batch-windows 1`).", "",
             "| store | clients | batching | requests | req/s | p50 ms | p99 ms | statuses |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["sweep"], key=lambda r: (r["store"] != "miss", r["clients"], not r["batching"])):
        lines.append(f"| {r['store']} | {r['clients']} | {'on' if r['batching'] else 'off'} | {r['requests']} | "
                     f"{r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['statuses']} |")
    o = res["overload"]
    lines += ["", f"## Overload: {o['clients']} clients, `--max-concurrent {o['max_concurrent']}`, "
                  f"{o['wall_s']:.0f} s, all misses", "",
              f"{o['requests']} requests: {o['statuses']}; unanswered (dropped, reset or timed out): "
              f"{o['unanswered']}. Refusals answered in p50 {o['refusal_p50_ms']:.1f} ms, p99 "
              f"{o['refusal_p99_ms']:.1f} ms; clients back off 100 ms after one."]
    k = res["kill"]
    lines += ["", f"## Two replicas (1 CPU each), one SIGKILLed at {k['killed_at_s']:.1f} s of {k['wall_s']:.0f} s, "
                  f"{k['clients']} clients, all misses", "",
              f"{k['requests']} requests, {k['failed']} failed ({', '.join(k['failed_statuses']) or 'none'})"
              + (f", the last of them {k['failed_within_s_of_kill']:.1f} s after the kill" if k["failed"] else "")
              + f". Throughput before the kill {k['throughput_before_rps']:.1f} req/s; back to 90% of it after "
              + (f"{k['seconds_to_full_throughput']:.0f} s" if k["seconds_to_full_throughput"] is not None
                 else "more than the run")
              + f" (throughput averaged over {k.get('recovery_span_s', 1)} s spans)"
              + " (Ray Serve starts a replacement, which loads the bundle and warms up before it takes traffic). "
              f"Requests per second, 1 s bins: "
              f"{', '.join(f'{x:.0f}' for x in k['rate_per_bin'])}."]
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--bundle", required=True)
@click.option("--data", default="timecma/datasets/ETTh1.csv", show_default=True)
@click.option("--backend", default="auto", show_default=True)
@click.option("--clients", "levels", default="1,2,4,8,16,32", show_default=True)
@click.option("--duration-s", default=8.0, show_default=True, help="Per closed-loop row.")
@click.option("--port", default=8765, show_default=True)
@click.option("--out", required=True)
def main(bundle: str, data: str, backend: str, levels: str, duration_s: float, port: int, out: str) -> None:
    import ray

    from timecma.core.ray_setup import LOCAL, connect

    m = read_manifest(bundle)
    windows = Windows(data, m.data.time_col, m.data.variables, m.model_config.seq_len)
    work = tempfile.mkdtemp(prefix="timecma-load-")
    connect(LOCAL, progress=False)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    res: dict = {"machine": machine_info(), "ray": ray.__version__, "backend": backend, "cpus": cpus,
                 "duration_s": duration_s,
                 "bundle": f"{m.model_config.model}, LLM {m.llm.id if m.llm else None} (d_llm {m.model_config.d_llm}), "
                           f"N = {len(m.data.variables)}, seq_len {m.model_config.seq_len}, "
                           f"pred_len {m.model_config.pred_len}"}
    clients = [int(x) for x in levels.split(",")]
    try:
        res["sweep"] = [r for batching in (True, False) for r in sweep(
            bundle, windows, port, work, backend=backend, cpus=cpus, levels=clients, duration_s=duration_s,
            batching=batching)]
        res["overload"] = overload(bundle, windows, port, work, backend=backend, cpus=cpus, clients=max(clients),
                                   max_concurrent=4, duration_s=duration_s)
        res["kill"] = replica_kill(bundle, windows, port, work, backend=backend, clients=8, max_concurrent=8,
                                   duration_s=4 * duration_s, kill_at=duration_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(res))
    click.echo(f"wrote {out}/results.json and results.md")


if __name__ == "__main__":
    main()
