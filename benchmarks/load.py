"""Closed-loop load on ``timecma-serve`` over loopback, in one run: the single process (uvicorn, the default),
Ray Serve with its default proxy, and Ray Serve with the latency settings (HAProxy in front of the replica's
own HTTP server: ``RAY_SERVE_ENABLE_HA_PROXY=1``, ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``); store hits and
misses at 1 to 32 clients; and in-process ``Forecaster.predict`` on the same windows as the floor.

    python -m benchmarks.load --bundle runs/load-demo/etth1/bundle --out benchmarks/results/load-demo

Each server runs as ``timecma-serve`` would (a subprocess of this one, one replica of the whole machine's
CPUs for Ray), with ``--max-concurrent`` at the largest client count so that nothing is refused. Each
client holds one kept-alive connection and sends its next request when the previous one is answered
(closed loop). A miss request is a window no request sent before to that server (successive ETTh1
windows, shifted by a constant after the data runs out: every server, and the floor, sees the same
sequence), so each of its N prompts misses the store; a hit request repeats one of a few windows sent
once before the clock starts. The clients run in this process, on the same cores as the server: their
Python is part of every figure. The load average before and after each server is recorded (another
job on the machine shows up there).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import click
import numpy as np
import pyarrow.csv as pcsv

from timecma.core.manifest import read_manifest

from .machine import machine_info, machine_line

HOST = "127.0.0.1"
MODES = {  # name -> (timecma-serve arguments, what it is)
    "single": ([], "one process, uvicorn (the default)"),
    "ray-default": (["--ray", "--ray-proxy", "ray"], "Ray Serve, its own proxy"),
    "ray-latency": (["--ray", "--ray-proxy", "haproxy"], "Ray Serve, HAProxy + throughput-optimized"),
}


class Windows:
    """Request bodies: ``fresh()`` the next window of a sequence (``reset()`` starts it again), ``repeat(k)``
    one of a fixed few; ``arrays(i)`` the same window as arrays (for the in-process floor)."""

    def __init__(self, data: str, time_col: str, variables: list[str], seq_len: int, start_row: int = 0):
        t = pcsv.read_csv(data, convert_options=pcsv.ConvertOptions(timestamp_parsers=["%Y-%m-%d %H:%M:%S"]))
        self.values = np.stack([t.column(v).to_numpy().astype(float) for v in variables], axis=1)[start_row:]
        self.stamps = [str(s) for s in t.column(time_col).to_numpy().astype("datetime64[s]")[start_row:]]
        self.seq_len = seq_len
        self.span = len(self.values) - seq_len
        self._next = itertools.count()
        self._lock = threading.Lock()

    def _rows(self, i: int) -> tuple[np.ndarray, list[str]]:
        """Window i: rows i..i+seq_len (mod the data), values shifted by 0.5 per pass so no two are alike."""
        start, shift = i % self.span, 0.5 * (i // self.span)
        return np.round(self.values[start:start + self.seq_len] + shift, 4), self.stamps[start:start + self.seq_len]

    def body(self, i: int) -> bytes:
        rows, stamps = self._rows(i)
        return json.dumps({"timestamps": stamps, "values": rows.tolist()}).encode()

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rows, stamps = self._rows(i)
        return rows, np.array(stamps, dtype="datetime64[ns]")

    def reset(self) -> None:
        with self._lock:
            self._next = itertools.count()

    def fresh(self) -> bytes:
        with self._lock:
            i = next(self._next)
        return self.body(i)

    def hit_index(self, k: int) -> int:
        return self.span - 1 - k  # the data's last windows: far from what fresh() reaches first

    def repeat(self, k: int) -> bytes:
        return self.body(self.hit_index(k))


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


# -- the run -------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _repeating(windows: Windows, n: int) -> Callable[[], bytes]:
    """Requests for the first ``n`` windows in turn, again and again (store hits once each was served)."""
    it = itertools.count()
    return lambda: windows.repeat(next(it) % n)


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def floor(bundle: str, windows: Windows, backend: str, work: str, *, hit_windows: int, iters: int,
          miss_windows: int) -> dict:
    """In-process ``Forecaster.predict`` on the windows the servers get: hits (after one call each) and misses."""
    from timecma.runtime import Forecaster

    out: dict[str, Any] = {}
    with Forecaster.load(bundle, backend=backend, store=os.path.join(work, "store-floor")) as f:
        hits = [windows.arrays(windows.hit_index(k)) for k in range(hit_windows)]
        for v, t in hits:
            f.predict(v, t)
        lat = []
        for i in range(iters):
            v, t = hits[i % hit_windows]
            s = time.perf_counter()
            f.predict(v, t)
            lat.append(time.perf_counter() - s)
        out["hit"] = _stats(lat)
        lat = []
        for i in range(miss_windows):
            v, t = windows.arrays(i)
            s = time.perf_counter()
            f.predict(v, t)
            lat.append(time.perf_counter() - s)
        out["miss"] = _stats(lat)
        out["served_by"] = f.backend.name
    return out


def _stats(lat: list[float]) -> dict:
    a = np.array(lat) * 1e3
    return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "throughput_rps": float(1e3 / a.mean())}


class Server:
    """``timecma-serve`` in a subprocess (its own Ray cluster for the Ray modes), stopped with SIGINT."""

    def __init__(self, bundle: str, mode: str, port: int, work: str, backend: str, max_concurrent: int):
        self.log_path = os.path.join(work, f"serve-{mode}.log")
        home = os.path.join(work, "home")  # Ray keeps its auth token under $HOME/.ray: not the user's
        os.makedirs(home, exist_ok=True)
        env = {**os.environ, "HOME": home, "TOKENIZERS_PARALLELISM": "false"}
        env.pop("RAY_AUTH_MODE", None)
        cmd = [sys.executable, "-m", "timecma.runtime.serving.serve_cli", "--bundle", bundle, "--port", str(port),
               "--backend", backend, "--store", os.path.join(work, f"store-{mode}"), "--max-concurrent",
               str(max_concurrent), *MODES[mode][0]]
        if mode != "single":
            cmd += ["--cpus-per-replica", str(os.cpu_count() or 1)]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.port = port

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.tail()}")
            try:
                if get(self.port, "/health")[0] == 200:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server was not ready within {timeout_s:.0f} s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        with open(self.log_path) as f:
            return f.read()[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:  # its whole session (Ray's processes too)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def run_mode(bundle: str, mode: str, windows: Windows, work: str, *, backend: str, levels: list[int],
             duration_s: float, hit_windows: int) -> dict:
    port = _free_port()
    res: dict = {"mode": mode, "what": MODES[mode][1], "load_before": _load_avg(), "rows": []}
    server = Server(bundle, mode, port, work, backend, max(levels))
    try:
        t = time.perf_counter()
        server.wait_ready()
        res["start_s"] = time.perf_counter() - t
        res["served_by"] = get(port, "/info")[1]["backend"]
        for k in range(hit_windows):  # into the store before any clock
            if post(port, windows.repeat(k)) != 200:
                raise RuntimeError(f"warming request {k} was refused")
        windows.reset()
        for phase in ("miss", "hit"):
            for c in levels:
                nxt = windows.fresh if phase == "miss" else _repeating(windows, hit_windows)
                s = closed_loop(port, nxt, c, duration_s).summary()
                s.update(mode=mode, store=phase, clients=c)
                res["rows"].append(s)
                click.echo(f"{mode:12s} {phase:4s} {c:3d} clients: {s['throughput_rps']:7.1f} req/s  "
                           f"p50 {s['p50_ms'] or float('nan'):7.2f} ms  p99 {s['p99_ms'] or float('nan'):7.2f} ms  "
                           f"{s['statuses']}")
    except RuntimeError as exc:
        res["error"] = str(exc)
        click.echo(f"{mode}: {exc}", err=True)
    finally:
        server.stop()
    res["load_after"] = _load_avg()
    return res


def _row(res: dict, mode: str, store: str, clients: int) -> dict | None:
    m = next((m for m in res["modes"] if m["mode"] == mode), None)
    return next((r for r in (m or {}).get("rows", []) if r["store"] == store and r["clients"] == clients), None)


BORDERLINE = 0.1  # a result within 10% of its bound is within the run-to-run spread on a loaded machine


def _judged(target: str, value: str, got: float, bound: float, at_most: bool, shown: str) -> dict:
    """A target judged on this run: ``met``, and ``verdict`` (the table's cell): yes, **no**, or borderline
    (within ``BORDERLINE`` of the bound: another run under the same load may land on the other side)."""
    met = got <= bound if at_most else got >= bound
    verdict = "yes" if met else "**no**"
    if abs(got - bound) <= BORDERLINE * abs(bound):
        verdict = f"borderline ({'met' if met else 'missed'} in this run at {shown})"
    return {"target": target, "value": value, "met": met, "verdict": verdict}


def targets(res: dict) -> list[dict]:
    """The issue's three targets, judged on this run."""
    out = []
    fl = res["floor"]["hit"]["p50_ms"]
    single1 = _row(res, "single", "hit", 1)
    if single1:
        d = single1["p50_ms"] - fl
        out.append(_judged("single-process hit p50 at 1 client within 1 ms of in-process predict",
                           f"{single1['p50_ms']:.2f} ms vs {fl:.2f} ms: +{d:.2f} ms", d, 1.0, True, f"+{d:.2f} ms"))
    peak = max((r["throughput_rps"] for m in res["modes"] if m["mode"] == "single" for r in m.get("rows", [])
                if r["store"] == "hit"), default=None)
    if peak is not None:
        out.append(_judged("hit throughput >= 5x the 104 req/s of issue 40 (520 req/s)",
                           f"{peak:.0f} req/s (single process, best client count)", peak, 520, False,
                           f"{peak:.0f} req/s"))
    ray1 = _row(res, "ray-latency", "hit", 1)
    if single1 and ray1:
        d = ray1["p50_ms"] - single1["p50_ms"]
        out.append(_judged("Ray Serve with the latency settings within 2 ms of the single process at 1 client",
                           f"{ray1['p50_ms']:.2f} ms vs {single1['p50_ms']:.2f} ms: +{d:.2f} ms", d, 2.0, True,
                           f"+{d:.2f} ms"))
    return out


def markdown(res: dict) -> list[str]:
    mi = res["machine"]
    fl = res["floor"]
    lines = [f"# timecma-serve under load: single process vs Ray Serve ({mi['date']})", "", machine_line(mi), "",
             f"Load average (1, 5, 15 min) at the start: {res['load_start']}, at the end: {res['load_end']} "
             f"(`uptime`: {res['uptime_start']}). {res.get('note', '')}".rstrip(), "",
             f"Bundle: {res['bundle']}; backend `{res['backend']}` ({fl['served_by']}). Loopback HTTP; the clients run "
             f"on the same {mi['cores']} cores (closed loop, one kept-alive connection each); {res['duration_s']:g} s "
             f"per row; `--max-concurrent {max(res['clients'])}`, dynamic batching on. Versions: "
             + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
             "## The floor: in-process `Forecaster.predict`, one thread, the same windows", "",
             "| store | p50 ms | p99 ms | req/s |", "|---|---|---|---|"]
    for k in ("hit", "miss"):
        lines.append(f"| {k} | {fl[k]['p50_ms']:.2f} | {fl[k]['p99_ms']:.2f} | {fl[k]['throughput_rps']:.0f} |")
    lines += ["", "## Closed loop over HTTP", ""]
    for m in res["modes"]:
        lines.append(f"- `{m['mode']}`: {m['what']}"
                     + (f"; ready {m['start_s']:.0f} s after start" if "start_s" in m else "")
                     + f"; load average before {m['load_before']}, after {m['load_after']}"
                     + (f"; **not measured: {m['error'][:300]}**" if "error" in m else ""))
    modes = [m["mode"] for m in res["modes"]]
    lines += ["", "| store | clients | " + " | ".join(f"{m} req/s | {m} p50 ms | {m} p99 ms" for m in modes) + " |",
              "|---|---|" + "---|---|---|" * len(modes)]
    for store in ("hit", "miss"):
        for c in res["clients"]:
            cells = []
            for m in modes:
                r = _row(res, m, store, c)
                cells += ([f"{r['throughput_rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}"]
                          if r and r["p50_ms"] is not None else ["-", "-", "-"])
            lines.append(f"| {store} | {c} | " + " | ".join(cells) + " |")
    if res.get("profile"):
        lines += ["", "## What bounds the single process at one client", "", res["profile"]]
    bad = [(m["mode"], r["store"], r["clients"], r["statuses"]) for m in res["modes"] for r in m.get("rows", [])
           if set(r["statuses"]) != {"200"}]
    lines += ["", "Every request answered 200." if not bad else f"Not all 200: {bad}.", "", "## Targets (issue 40)", "",
              "| target | this run | met |", "|---|---|---|"]
    for t in res["targets"]:
        verdict = t.get("verdict") or ("yes" if t["met"] else "**no**")
        if t.get("note"):  # e.g. another run's figure, recorded by hand in results.json
            verdict = f"{verdict[:-1]}; {t['note']})" if verdict.endswith(")") else f"{verdict} ({t['note']})"
        lines.append(f"| {t['target']} | {t['value']} | {verdict} |")
    return lines


def _versions() -> dict:
    out = {}
    for name in ("fastapi", "starlette", "uvicorn", "pydantic", "ray"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    from timecma.runtime.serving.ray_serve import haproxy_binary

    binary = haproxy_binary()
    if binary:
        first = subprocess.run([binary, "-v"], capture_output=True, text=True).stdout.splitlines()
        out["haproxy"] = first[0].split()[2] if first else "?"
    return out


@click.command()
@click.option("--bundle", required=True)
@click.option("--data", default="timecma/datasets/ETTh1.csv", show_default=True)
@click.option("--backend", default="auto", show_default=True)
@click.option("--clients", "levels", default="1,2,4,8,16,32", show_default=True)
@click.option("--duration-s", default=2.5, show_default=True, help="Per closed-loop row.")
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option("--note", default="", help="A sentence for results.md (e.g. what else ran on the machine).")
@click.option("--out", required=True)
@click.option("--markdown-only", is_flag=True, help="Rewrite results.md from --out's results.json (no run).")
def main(bundle: str, data: str, backend: str, levels: str, duration_s: float, modes: str, note: str, out: str,
         markdown_only: bool) -> None:
    if markdown_only:
        with open(os.path.join(out, "results.json")) as f:
            saved = json.load(f)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write("\n".join(markdown(saved)) + "\n")
        return
    m = read_manifest(bundle)
    windows = Windows(data, m.data.time_col, m.data.variables, m.model_config.seq_len)
    clients = [int(x) for x in levels.split(",")]
    work = tempfile.mkdtemp(prefix="timecma-load-")
    res: dict = {"machine": machine_info(), "versions": _versions(), "backend": backend, "duration_s": duration_s,
                 "clients": clients, "load_start": _load_avg(), "note": note,
                 "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                 "bundle": f"{m.model_config.model}, LLM {m.llm.id if m.llm else None} (d_llm {m.model_config.d_llm}), "
                           f"N = {len(m.data.variables)}, seq_len {m.model_config.seq_len}, "
                           f"pred_len {m.model_config.pred_len}"}
    try:
        res["floor"] = floor(bundle, windows, backend, work, hit_windows=8, iters=400, miss_windows=40)
        click.echo(f"floor: hit p50 {res['floor']['hit']['p50_ms']:.2f} ms, miss p50 "
                   f"{res['floor']['miss']['p50_ms']:.2f} ms")
        res["modes"] = [run_mode(bundle, mode, windows, work, backend=backend, levels=clients, duration_s=duration_s,
                                 hit_windows=8) for mode in modes.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["load_end"] = _load_avg()
    res["targets"] = targets(res)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(markdown(res)) + "\n")
    for t in res["targets"]:
        click.echo(f"{'MET   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']}"
                   + (" (borderline)" if t.get("verdict", "").startswith("borderline") else ""))
    click.echo(f"wrote {out}/results.json and results.md")


if __name__ == "__main__":
    main()
