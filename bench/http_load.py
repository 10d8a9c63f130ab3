"""HTTP load for bench/serve_clients.py: server processes, closed-loop clients and open-loop
floods on loopback, with keep-alive connections (threads in the calling process)."""

from __future__ import annotations

import http.client
import json
import math
import multiprocessing as mp
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, name: str, argv: list[str], port: int, log: Path, *, cwd: Path | None = None,
                 env: dict | None = None):
        self.name, self.port, self.log = name, port, log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, env=env)

    def wait_ready(self, timeout=300.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout} s: {self.log.read_text()[-3000:]}")

    def rss(self) -> int:
        """Resident memory of the server's process tree, bytes."""
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for q in procs:
            try:
                total += q.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@dataclass(frozen=True)
class Target:
    """Where one model answers and what its requests and answers look like."""

    port: int
    path: str  # /v1/embeddings (bertexport, plain, st), /embeddings (infinity), /v1/<task>
    model: str
    kind: str = "embedding"  # or "task": {"inputs": text} -> {"results": [...]}

    def body(self, text: str) -> str:
        key = "input" if self.kind == "embedding" else "inputs"
        return json.dumps({"model": self.model, key: text})

    def answer(self, raw: bytes, width: int) -> list | None:
        """The embedding (or [] for a task answer) when the answer is well formed, else None."""
        data = json.loads(raw)
        if self.kind != "embedding":
            return [] if len(data["results"]) == 1 else None
        vec = data["data"][0]["embedding"]
        ok = (not width or len(vec) == width) and all(math.isfinite(x) for x in vec)
        return vec if ok else None


def post(conn: http.client.HTTPConnection, target: Target, text: str) -> tuple[int, bytes]:
    conn.request("POST", target.path, body=target.body(text), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def probe_width(target: Target, text: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=120)
    status, body = post(conn, target, text)
    conn.close()
    if status != 200:
        raise RuntimeError(f"127.0.0.1:{target.port}{target.path} answered {status}: {body[:300]!r}")
    vec = target.answer(body, 0)
    return len(vec) if vec else 0


def closed_loop(groups: list[tuple[Target, int, int]], texts: list[str], seconds: float, warmup: float,
                keep: int = 0) -> list[dict]:
    """Closed-loop clients for warmup + seconds: ``groups`` of (target, clients, width), all at once.
    Per group: the measured part's latencies, errors, and the vectors answered for texts[:keep]."""
    start_at = time.monotonic() + 0.2
    measure_from = start_at + warmup
    stop_at = measure_from + seconds
    out = [{"latencies": [], "errors": 0, "error_examples": [], "vectors": {}, "seconds": seconds} for _ in groups]
    lock = threading.Lock()

    def client(g: int, k: int):
        target, _, width = groups[g]
        res = out[g]
        conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=60)
        i = k * 7919 + g * 104729
        lat, errors = [], 0
        while time.monotonic() < start_at:
            time.sleep(0.001)
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            idx = i % len(texts)
            i += 1
            t0 = time.perf_counter()
            vec, note = None, None
            try:
                status, raw = post(conn, target, texts[idx])
                if status == 200:
                    vec = target.answer(raw, width)
                    note = None if vec is not None else f"malformed answer: {raw[:200]!r}"
                else:
                    note = f"{status}: {raw[:200]!r}"
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                note = repr(e)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=60)
            t1 = time.perf_counter()
            if idx < keep and vec:
                res["vectors"].setdefault(idx, vec)  # one answer per text is enough (dict ops are atomic)
            if now >= measure_from:
                if vec is not None:
                    lat.append(t1 - t0)
                else:
                    errors += 1
                    with lock:
                        if len(res["error_examples"]) < 3:
                            res["error_examples"].append(note)
        conn.close()
        with lock:
            res["latencies"].extend(lat)
            res["errors"] += errors

    threads = [threading.Thread(target=client, args=(g, k)) for g, (_, n, _) in enumerate(groups) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def percentile_ms(values: list[float], p: float) -> float:
    lat = sorted(values)
    return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] * 1000 if lat else float("nan")



def flood(target: Target, server: ServerProcess, texts: list[str], rate: float, seconds: float, connections: int,
          width: int, timeout: float = 30.0) -> dict:
    """Open-loop arrivals at ``rate`` req/s for ``seconds`` over ``connections`` connections.
    Latency is counted from each request's scheduled time (a request no connection was free to
    send on time waits in it); the server's RSS is sampled every 0.1 s."""
    total = max(1, int(rate * seconds))
    start = time.monotonic() + 0.5
    lock = threading.Lock()
    nxt = [0]
    statuses: dict[str, int] = {}
    ok_lat, late = [], []
    rss = [server.rss()]
    done = threading.Event()

    def sample():
        while not done.wait(0.1):
            rss.append(server.rss())

    def worker(k: int):
        conn = None
        while True:
            with lock:
                n = nxt[0]
                nxt[0] += 1
            if n >= total:
                break
            due = start + n / rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            sent = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=timeout)
                status, raw = post(conn, target, texts[(n * 7919) % len(texts)])
                key = str(status) if status != 200 or target.answer(raw, width) is not None else "200-malformed"
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                key = type(e).__name__
                if conn is not None:
                    conn.close()
                conn = None
            end = time.monotonic()
            with lock:
                statuses[key] = statuses.get(key, 0) + 1
                late.append(sent - due)
                if key == "200":
                    ok_lat.append(end - due)
        if conn is not None:
            conn.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    done.set()
    sampler.join()
    n503 = statuses.get("503", 0)
    return {"rate": rate, "seconds": seconds, "connections": connections, "sent": total, "statuses": statuses,
            "share_503": n503 / total, "ok": len(ok_lat), "ok_per_s": len(ok_lat) / wall, "wall_seconds": wall,
            "p50_ok_ms": percentile_ms(ok_lat, 50), "p99_ok_ms": percentile_ms(ok_lat, 99),
            "p99_send_late_ms": percentile_ms([max(0.0, x) for x in late], 99),
            "rss_before_mb": rss[0] / 2**20, "rss_peak_mb": max(rss) / 2**20}


# -- one model probed from its own process while another is loaded (issue #25) --------------------

def _probe(target: Target, width: int, texts, seconds: float, warmup: float, ready, go, results) -> None:
    ready.set()
    go.wait()
    (res,) = closed_loop([(target, 1, width)], texts, seconds, warmup)
    results.put(res)


def measure_beside(a: Target, b: Target, widths: dict, texts, seconds: float, warmup: float, clients: int) -> tuple[dict, dict | None]:
    """``b`` probed from its own process; with ``clients``, ``a`` loaded from this one at the same time."""
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
    p = ctx.Process(target=_probe, args=(b, widths[b.model], texts, seconds, warmup, ready, go, results))
    p.start()
    ready.wait(60)
    go.set()
    ra = closed_loop([(a, clients, widths[a.model])], texts, seconds, warmup)[0] if clients else None
    rb = results.get(timeout=seconds + warmup + 120)
    p.join(30)
    return rb, ra
