"""`bertexport serve`: the real server process on loopback, torch and transformers imports
blocked (a device install). Its answers are compared with `bertexport run --json` on the
same artifact and texts; bad requests, a full queue, untrusted artifacts and SIGTERM are
sent for real."""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.shipping.serve_app import batch_tolerance
from tests.dockerfiles import parse_dockerfile
from tests.torchfree import BLOCK_TORCH

pytest.importorskip("uvicorn", reason="serve needs bertexport[serve]")

TASKS = ("feature-extraction", "text-classification", "token-classification", "question-answering", "fill-mask")
LONG = " ".join(["Maria Schmidt flew from Berlin to Lisbon on Tuesday to see the museum."] * 40)  # ~2,900 chars: windows
TEXTS = {
    "feature-extraction": ["A gripping, beautifully shot film.", "ok", LONG],
    "text-classification": ["The film was a delight from start to finish.", "dull", LONG],
    "token-classification": ["Maria Schmidt flew from Berlin to Lisbon on Tuesday.", "Paris and Berlin", LONG],
    "question-answering": ["When did the museum open?", "What does it hold?"],
    "fill-mask": ["The capital of France is [MASK].", "A [MASK] film with a [MASK] ending.", LONG + " [MASK]."],
}
CONTEXT = "The museum opened in 1897 and holds more than two thousand paintings from the Renaissance. " * 8

# the server process: a device install (torch/transformers/optimum imports fail); says at exit
# whether torch or transformers was imported while it served
SERVER_CODE = BLOCK_TORCH + """
from bertexport.cli import main
sys.argv = ["bertexport", "serve"] + sys.argv[1:]
try:
    main()
finally:
    bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))
    print('torch-free: ' + ('yes' if not bad else 'NO ' + ','.join(bad[:3])), file=sys.stderr, flush=True)
"""


class Server:
    """`bertexport serve ART --port 0 ...` in a subprocess; ``url`` once it listens."""

    def __init__(self, art, *args, log: Path, env: dict | None = None):
        self.art = Path(art)
        self.log = log
        self._err = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, str(art), "--port", "0", *map(str, args)],
                                     stdout=subprocess.DEVNULL, stderr=self._err, env=env)
        self.url = None

    def wait_listening(self, timeout=60.0) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            for line in text.splitlines():
                if line.startswith("serving ") and " on http://" in line:
                    self.url = line.split(" on ")[1].split(" ")[0]
                    self.host, self.port = self.url[len("http://"):].rsplit(":", 1)
                    return self
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {text}")
            time.sleep(0.05)
        raise AssertionError(f"server not listening after {timeout} s: {self.log.read_text()}")

    def request(self, method, path, body=None, headers=None, timeout=60):
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            raw = r.read()
            return r.status, dict(r.getheaders()), raw
        finally:
            conn.close()

    def post(self, path, body, **kw):
        status, headers, raw = self.request("POST", path, body, **kw)
        return status, headers, json.loads(raw)

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._err.close()


def run_json(art, texts, context=None, *extra):
    """What `bertexport run ART TEXTS --json -` prints, one dict per text."""
    args = ["run", str(art), *texts, "--json", "-", *extra] + (["--context", context] if context else [])
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.strip().splitlines()]


def same_answers(served, ran, manifest):
    """Bit for bit for a batch-invariant artifact, else within its measured tolerance."""
    tol = batch_tolerance(manifest)
    if tol == 0.0:
        assert served == ran
        return

    def close(a, b):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for k in a:
                close(a[k], b[k])
        elif isinstance(a, list):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                close(x, y)
        elif isinstance(a, float):
            assert abs(a - b) <= tol, (a, b)
        else:
            assert a == b

    close(served, ran)


@pytest.fixture(scope="module")
def artifacts(fp32_artifact):
    """ort-fp32 builds of tiny BERT for every task, shared with the session (read only)."""
    return {task: fp32_artifact("bert", task).artifact for task in TASKS}


@pytest.fixture(scope="module")
def servers(artifacts, tmp_path_factory):
    """One server per task, started together. The embeddings server waits up to 20 ms to
    coalesce requests, and has small limits for the bad-request cases."""
    logs = tmp_path_factory.mktemp("serve-logs")
    extra = {"feature-extraction": ["--max-wait-ms", 20, "--max-texts", 8, "--max-chars", 20000, "--max-body-bytes", 100_000]}
    started = {t: Server(artifacts[t], *extra.get(t, []), log=logs / f"{t}.log") for t in TASKS}
    try:
        yield {t: s.wait_listening() for t, s in started.items()}
    finally:
        for s in started.values():
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        codes = {t: s.stop() for t, s in started.items()}
    # every server, having answered its tests' requests, stopped by the contract and never imported torch
    assert codes == {t: 143 for t in TASKS}, codes
    for s in started.values():
        assert "torch-free: yes" in s.log.read_text(), s.log.read_text()


def manifest_of(art):
    return json.loads((Path(art) / "manifest.json").read_text())


# -- answers equal run's ------------------------------------------------------------------------

def test_openai_client_embeddings_equal_run(servers, artifacts):
    from openai import OpenAI

    server, art = servers["feature-extraction"], artifacts["feature-extraction"]
    texts = TEXTS["feature-extraction"]
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    ran = [r["embedding"] for r in run_json(art, texts)]
    res = client.embeddings.create(model="feature-extraction", input=texts, encoding_format="float")
    assert [d.index for d in res.data] == [0, 1, 2] and res.model == "feature-extraction"
    same_answers([d.embedding for d in res.data], ran, manifest_of(art))
    res = client.embeddings.create(model="feature-extraction", input=texts, encoding_format="base64")  # asked: not decoded
    same_answers([np.frombuffer(base64.b64decode(d.embedding), "<f4").tolist() for d in res.data], ran, manifest_of(art))
    res = client.embeddings.create(model="feature-extraction", input=texts)  # the client's default (base64)
    same_answers([list(map(float, d.embedding)) for d in res.data], ran, manifest_of(art))
    # usage: every token of every text (special tokens included; the long one is windowed, not cut)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(art) / "tokenizer" / "tokenizer.json"))
    tok.no_truncation()
    expected = sum(len(tok.encode(t).ids) for t in texts)
    assert res.usage.prompt_tokens == res.usage.total_tokens == expected > 128
    one = client.embeddings.create(model="feature-extraction", input=texts[0])
    same_answers([list(map(float, one.data[0].embedding))], ran[:1], manifest_of(art))
    models = client.models.list()
    assert [m.id for m in models.data] == ["feature-extraction"]


def test_fp32_artifact_answers_bit_for_bit(servers, artifacts):
    """ORT fp32 is batch-invariant on CPU: whatever the server batched a text with, its
    vector is `run`'s, bit for bit (the tolerance path is for artifacts that move)."""
    server, art = servers["feature-extraction"], artifacts["feature-extraction"]
    texts = TEXTS["feature-extraction"] + ["Paris is the capital of France.", "a b c d e f g"]
    ran = [r["embedding"] for r in run_json(art, texts)]
    with ThreadPoolExecutor(len(texts)) as pool:  # each text in its own request, concurrently
        served = list(pool.map(lambda t: server.post("/v1/embeddings", {"input": [t]})[2]["data"][0]["embedding"], texts))
    assert served == ran


@pytest.mark.parametrize("task", TASKS)
def test_task_endpoint_returns_what_run_json_prints(servers, artifacts, task):
    server, art = servers[task], artifacts[task]
    texts = TEXTS[task]
    body = {"inputs": texts} | ({"context": CONTEXT} if task == "question-answering" else {})
    status, _, out = server.post(f"/v1/{task}", body)
    assert status == 200, out
    assert out["task"] == task and out["model"] == task and out["usage"]["prompt_tokens"] > 0
    ran = run_json(art, texts, CONTEXT if task == "question-answering" else None)
    same_answers(out["results"], ran, manifest_of(art))
    if task == "question-answering":  # one context per question
        status, _, out = server.post(f"/v1/{task}", {"inputs": texts, "context": [CONTEXT, CONTEXT[:200]]})
        assert status == 200
        (second,) = run_json(art, texts[1:], CONTEXT[:200])
        same_answers(out["results"][1], second | {"index": 1}, manifest_of(art))
        same_answers(out["results"][:1], ran[:1], manifest_of(art))


def test_wrong_endpoint_for_the_task(servers):
    status, _, out = servers["text-classification"].post("/v1/embeddings", {"input": "a film"})
    assert status == 404 and "POST /v1/text-classification" in out["error"]["message"]
    status, _, out = servers["text-classification"].post("/v1/embeddings", {"input": "a film", "model": "x"})
    assert status == 404 and "model 'x' is not served here" in out["error"]["message"]
    assert "'text-classification'" in out["error"]["message"] and out["error"]["code"] == "model_not_found"
    status, _, out = servers["feature-extraction"].post("/v1/token-classification", {"inputs": "Paris"})
    assert status == 404 and "POST /v1/embeddings" in out["error"]["message"]
    status, _, out = servers["text-classification"].post("/v1/text-classification", {"inputs": "x", "context": "y"})
    assert status == 400 and "question-answering" in out["error"]["message"]


def test_models_health_ready_and_metrics(servers):
    server = servers["text-classification"]
    status, _, raw = server.request("GET", "/v1/models")
    model = json.loads(raw)["data"][0]
    assert status == 200 and model["id"] == "text-classification" and model["task"] == "text-classification"
    assert model["target"] == "ort-fp32"
    assert server.request("GET", "/health")[0] == 200
    status, _, raw = server.request("GET", "/ready")
    assert status == 200 and json.loads(raw)["status"] == "ready"
    for _ in range(3):
        assert server.post("/v1/text-classification", {"inputs": ["good", "bad"]})[0] == 200
    assert server.post("/v1/text-classification", {"inputs": ""})[0] == 400
    status, headers, raw = server.request("GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = _metrics(text)
    assert values[('bertexport_requests_total', 'code="200",endpoint="/v1/text-classification"')] >= 3
    assert values[('bertexport_request_errors_total', 'code="400",endpoint="/v1/text-classification"')] >= 1
    assert values[('bertexport_request_duration_seconds_count', 'endpoint="/v1/text-classification"')] >= 4
    label = 'model="text-classification"'
    assert values[('bertexport_batch_texts_sum', label)] >= 6 and values[('bertexport_batch_texts_count', label)] >= 3
    assert ('bertexport_queue_depth', label) in values and ('bertexport_requests_in_flight', '') in values


def _metrics(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            labels = name[name.index("{") + 1:-1] if "{" in name else ""
            out[(name.split("{")[0], labels)] = float(value)
    return out


# -- load -------------------------------------------------------------------------------------------

def test_64_concurrent_clients_all_answered_correctly(servers, artifacts):
    server, art = servers["feature-extraction"], artifacts["feature-extraction"]
    words = "film plot actor scene music story ending camera light dialogue".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 17)) + f" number {i}" for i in range(64 * 3)]
    ran = {t: r["embedding"] for t, r in zip(texts, run_json(art, texts))}
    before = _metrics(server.request("GET", "/metrics")[2].decode())
    barrier = threading.Barrier(64)

    def client(k):
        barrier.wait()  # all 64 at once
        got = []
        for t in texts[k * 3:(k + 1) * 3]:
            status, _, out = server.post("/v1/embeddings", {"input": t, "model": "feature-extraction"})
            got.append((t, status, out))
        return got

    with ThreadPoolExecutor(64) as pool:
        answers = [a for got in pool.map(client, range(64)) for a in got]
    assert len(answers) == 192
    assert [s for _, s, _ in answers] == [200] * 192, [o for _, s, o in answers if s != 200][:3]
    for t, _, out in answers:
        same_answers(out["data"][0]["embedding"], ran[t], manifest_of(art))
    after = _metrics(server.request("GET", "/metrics")[2].decode())
    label = 'model="feature-extraction"'
    batches = after[("bertexport_batch_requests_count", label)] - before[("bertexport_batch_requests_count", label)]
    requests = after[("bertexport_batch_requests_sum", label)] - before[("bertexport_batch_requests_sum", label)]
    assert requests == 192 and batches < 192  # concurrent requests were coalesced


def test_full_queue_answers_503_with_retry_after(artifacts, tmp_path):
    art = artifacts["text-classification"]
    server = Server(art, "--queue-size", 1, "--max-batch-tokens", 1, log=tmp_path / "q.log").wait_listening()
    try:
        long_text = " ".join(["the museum holds paintings from the Renaissance"] * 1500)  # ~70k characters
        barrier = threading.Barrier(12)

        def client(_):
            barrier.wait()
            return server.post("/v1/text-classification", {"inputs": [long_text]})

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(client, range(12)))
        statuses = sorted(s for s, _, _ in answers)
        assert 503 in statuses and 200 in statuses and set(statuses) == {200, 503}, statuses
        expected = run_json(art, [long_text])
        for status, headers, out in answers:
            if status == 503:
                assert headers["retry-after"] == "1" and out["error"]["code"] == "queue_full"
            else:
                same_answers(out["results"], expected, manifest_of(art))
        status, _, out = server.post("/v1/text-classification", {"inputs": ["still serving"]})
        assert status == 200 and out["results"][0]["label"]
    finally:
        assert server.stop() == 143


# -- bad requests never hurt the server ---------------------------------------------------------------

BAD = [
    (b'{"input": "unfinished', 400, "not valid JSON"),
    (b"\xff\xfe\x00garbage", 400, "not valid JSON"),
    (b"[" * 50_000, 400, "not valid JSON"),  # nesting deeper than the parser's recursion
    (b"", 400, "empty"),
    (b'["a list"]', 400, "JSON object"),
    ({"input": 5}, 400, "'input' must be a string"),
    ({"input": ["fine", 3]}, 400, "'input' must be a string"),
    ({"input": []}, 400, "'input' must be a string"),
    ({}, 400, "'input' is missing"),
    ({"input": ""}, 400, "is empty"),
    ({"input": ["fine", "   "]}, 400, "'input[1]' is empty"),
    ({"input": [101, 2023, 102]}, 400, "token ids"),
    (b'{"input": "\\ud800 lone surrogate"}', 400, "lone surrogate"),
    ({"input": ["x"] * 9}, 400, "at most 8"),
    ({"input": "word " * 4001}, 400, "at most 20000"),
    ({"input": "fine", "encoding_format": "hex"}, 400, "encoding_format"),
    ({"input": "fine", "model": "text-embedding-3-small"}, 404, "not served here"),
    ({"input": "fine", "dimensions": 7}, 400, "dimensions"),
    ({"input": "x" * 120_000}, 413, "over 100000 bytes"),
]


def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(servers):
    server = servers["feature-extraction"]
    for body, status, needle in BAD:
        got, headers, raw = server.request("POST", "/v1/embeddings", body)
        assert got == status, (body[:40], got, raw[:200])
        error = json.loads(raw)["error"]
        assert needle in error["message"], (needle, error)
        assert b"Traceback" not in raw and headers["content-type"] == "application/json"
    # a body too large without a Content-Length (chunked) is cut off as it streams
    conn = http.client.HTTPConnection(server.host, int(server.port), timeout=30)
    conn.request("POST", "/v1/embeddings", body=iter([b'{"input": "', b"x" * 60_000, b"x" * 60_000, b'"}']),
                 encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and "over 100000 bytes" in json.loads(r.read())["error"]["message"]
    conn.close()
    for method, path, status in [("GET", "/v1/embeddings", 405), ("POST", "/v2/anything", 404), ("DELETE", "/health", 405)]:
        got, _, raw = server.request(method, path)
        assert got == status and json.loads(raw)["error"]["message"]
    # still serving, and nothing was logged as a crash
    status, _, out = server.post("/v1/embeddings", {"input": ["after the bad requests"]})
    assert status == 200 and len(out["data"][0]["embedding"]) == 32
    assert server.request("GET", "/health")[0] == 200 and server.proc.poll() is None
    assert "Traceback" not in server.log.read_text()


# -- trust and shutdown ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keypair(folder, name):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def test_untrusted_artifacts_refused_before_the_port_opens(artifacts, tmp_path):
    pytest.importorskip("model_signing", reason="signing needs bertexport[sign]")
    priv, pub = _keypair(tmp_path, "ci")
    _, other_pub = _keypair(tmp_path, "someone-else")
    signed = shutil.copytree(artifacts["text-classification"], tmp_path / "signed")
    assert CliRunner().invoke(cli, ["sign", str(signed), "--key", str(priv)]).exit_code == 0
    for art, key, needle in [(artifacts["text-classification"], pub, "is not signed"),
                             (signed, other_pub, "signed by a different key")]:
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, str(art), "--port", str(port), "--trusted-key", str(key)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        connected = False
        while proc.poll() is None:  # never listening, not even for a moment
            with socket.socket() as s:
                connected |= s.connect_ex(("127.0.0.1", port)) == 0
            time.sleep(0.005)
        err = proc.stderr.read()
        assert proc.returncode == 2 and not connected, err
        assert needle in err and "Traceback" not in err and "serving" not in err
    # the signed one, with its key (here from the environment variable), serves
    env = dict(os.environ, BERTEXPORT_TRUSTED_KEY=str(pub))
    server = Server(signed, log=tmp_path / "signed.log", env=env).wait_listening()
    try:
        assert server.post("/v1/text-classification", {"inputs": ["a signed film"]})[0] == 200
    finally:
        server.stop()


def test_sigterm_finishes_in_flight_requests_then_exits_143(artifacts, tmp_path):
    art = artifacts["text-classification"]
    server = Server(art, "--max-batch-tokens", 1, log=tmp_path / "term.log").wait_listening()
    texts = [f"{i} " + " ".join(["the museum holds paintings from the Renaissance"] * 800) for i in range(6)]  # ~38k chars
    with ThreadPoolExecutor(len(texts)) as pool:
        futures = [pool.submit(server.post, "/v1/text-classification", {"inputs": [t]}) for t in texts]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # all six accepted, none answered yet (one at a time, ~0.25 s each)
            m = _metrics(server.request("GET", "/metrics")[2].decode())
            if m[("bertexport_requests_in_flight", "")] >= len(texts):
                break
            time.sleep(0.005)
        else:
            raise AssertionError("the requests never got in flight together")
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with socket.socket() as s:  # no new connections once SIGTERM arrived
            refused = s.connect_ex(("127.0.0.1", int(server.port))) != 0
        still_running = server.proc.poll() is None
        answers = [f.result(timeout=60) for f in futures]
    assert refused and still_running
    assert [s for s, _, _ in answers] == [200] * len(texts)
    for (_, _, out), ran in zip(answers, run_json(art, texts)):
        same_answers(out["results"][0] | {"index": ran["index"]}, ran, manifest_of(art))
    assert server.stop() == 143
    log = server.log.read_text()
    assert "stopped (SIGTERM)" in log and "torch-free: yes" in log and "Traceback" not in log


def test_refusals_before_listening(artifacts):
    """Without the serve extra, or on a port already taken: exit 2, one line."""
    art = artifacts["text-classification"]
    code = "import sys; sys.modules['uvicorn'] = None\n" + SERVER_CODE
    r = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "pip install 'bertexport[serve]'" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-c", SERVER_CODE, str(art), "--port", str(port)], capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


# -- the batcher on its own ---------------------------------------------------------------------------------

def _batcher(calls, **kw):
    from bertexport.shipping.batching import Batcher

    def predict(texts, pairs):
        calls.append(list(texts))
        if "boom" in texts:
            raise ValueError("boom")
        return [{"text": t, "pair": p} for t, p in zip(texts, pairs or [None] * len(texts))]

    return Batcher(predict, lambda texts, pairs: [len(t.split()) for t in texts], **kw)


def test_batcher_coalesces_in_order_within_the_token_budget():
    calls = []
    b = _batcher(calls, max_batch_tokens=5, max_wait=0.2, queue_size=10)
    futures = [b.submit(["one two"]), b.submit(["three", "four five"]), b.submit(["six seven"]), b.submit(["eight"], ["ctx"])]
    b.start()  # all four queued: the first two hold 5 tokens; texts with pairs never share a call with texts alone
    assert [f.result(5) for f in futures] == [([{"text": "one two", "pair": None}], [2]),
                                              ([{"text": "three", "pair": None}, {"text": "four five", "pair": None}], [1, 2]),
                                              ([{"text": "six seven", "pair": None}], [2]),
                                              ([{"text": "eight", "pair": "ctx"}], [1])]
    b.stop(5)
    assert calls == [["one two", "three", "four five"], ["six seven"], ["eight"]] and not b.alive


def test_batcher_isolates_a_failing_request_and_refuses_when_full():
    from bertexport.shipping.batching import QueueFull

    calls = []
    b = _batcher(calls, max_batch_tokens=100, max_wait=0.2, queue_size=3)
    good, bad, other = b.submit(["fine"]), b.submit(["boom"]), b.submit(["also fine"])
    with pytest.raises(QueueFull):
        b.submit(["one too many"])
    b.start()
    assert good.result(5)[0] == [{"text": "fine", "pair": None}] and other.result(5)[0][0]["text"] == "also fine"
    with pytest.raises(ValueError, match="boom"):
        bad.result(5)
    assert calls[0] == ["fine", "boom", "also fine"]  # one batch, then each request alone
    b.stop(5)


# -- several models in one server, reranking, API keys ------------------------------------------------

KEY = "sk-test-0123456789abcdef"
QUERY = "When did the museum open?"
DOCUMENTS = ["The museum opened in 1897.", "Paris is the capital of France.", "a b c",
             "The river runs past the castle and the old market square.", CONTEXT * 4,  # ~2,900 chars: windowed
             "The museum holds paintings."]


def _cross_encoder(out: Path, tokenizer_cache: Path, labels: int) -> Path:
    """A tiny random-init BERT sequence classifier with a 1- or 2-logit head: a cross-encoder's
    shape (what it was trained on does not change how it is served)."""
    import torch
    import transformers as T

    from tests.tinymodels import CONFIGS, make_tokenizer

    tok = make_tokenizer("bert", tokenizer_cache / "bert")
    names = ["LABEL_0"] if labels == 1 else ["not_relevant", "relevant"]
    cfg = T.BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **CONFIGS["bert"],
                       id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(labels)
    model = T.BertForSequenceClassification(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rerankers(tmp_path_factory):
    """ort-fp32 cross-encoders, folders named `reranker` (2 logits) and `reranker-1` (1 logit),
    with the checkpoints they were built from."""
    from bertexport.building.convert import convert

    root = tmp_path_factory.mktemp("rerankers")
    out = {}
    for labels, name in [(2, "reranker"), (1, "reranker-1")]:
        ckpt = _cross_encoder(root / f"ckpt-{labels}", root / "tokenizers", labels)
        out[name] = (convert(str(ckpt), "ort-fp32", root / name, latency_runs=0).artifact, ckpt)
    return out


@pytest.fixture(scope="module")
def multi(artifacts, rerankers, tmp_path_factory):
    """One server process for four artifacts (two renamed with --model-name, two named by
    their folders), behind an API key given by the environment variable."""
    log = tmp_path_factory.mktemp("serve-multi") / "multi.log"
    arts = [artifacts["feature-extraction"], artifacts["text-classification"], rerankers["reranker"][0],
            rerankers["reranker-1"][0]]
    env = dict(os.environ, BERTEXPORT_API_KEY=KEY)
    server = Server(arts[0], *arts[1:], "--model-name", "embed", "--model-name", "sentiment", log=log, env=env)
    try:
        yield server.wait_listening()
    finally:
        assert server.stop() == 143
        text = log.read_text()
        assert "torch-free: yes" in text and "Traceback" not in text, text


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_several_models_routed_by_model(multi, artifacts):
    """Each model answers as `run` on its own artifact; a request must say which one."""
    served = ["embed", "sentiment", "reranker", "reranker-1"]
    status, _, raw = multi.request("GET", "/v1/models", headers=AUTH)
    models = json.loads(raw)["data"]
    assert status == 200 and [m["id"] for m in models] == served
    assert [m["task"] for m in models] == ["feature-extraction"] + ["text-classification"] * 3
    assert [RERANK_ENDPOINT in m["endpoints"] for m in models] == [False, False, True, True]
    texts = TEXTS["text-classification"]
    status, _, out = multi.post("/v1/text-classification", {"model": "sentiment", "inputs": texts}, headers=AUTH)
    assert status == 200 and out["model"] == "sentiment"
    same_answers(out["results"], run_json(artifacts["text-classification"], texts), manifest_of(artifacts["text-classification"]))
    status, _, out = multi.post("/v1/embeddings", {"model": "embed", "input": TEXTS["feature-extraction"]}, headers=AUTH)
    ran = [r["embedding"] for r in run_json(artifacts["feature-extraction"], TEXTS["feature-extraction"])]
    assert status == 200 and out["model"] == "embed"
    same_answers([d["embedding"] for d in out["data"]], ran, manifest_of(artifacts["feature-extraction"]))
    # without a model, with an unknown one, or on another model's endpoint: said, naming what is served
    status, _, out = multi.post("/v1/embeddings", {"input": "a film"}, headers=AUTH)
    assert status == 400 and out["error"]["code"] == "model_required"
    assert all(f"'{n}'" in out["error"]["message"] for n in served)
    status, _, out = multi.post("/v1/embeddings", {"input": "a film", "model": "text-embedding-3-small"}, headers=AUTH)
    assert status == 404 and out["error"]["code"] == "model_not_found" and out["error"]["param"] == "model"
    assert "'text-embedding-3-small' is not served here" in out["error"]["message"]
    assert all(f"'{n}'" in out["error"]["message"] for n in served)
    status, _, out = multi.post("/v1/embeddings", {"input": "a film", "model": "sentiment"}, headers=AUTH)
    assert status == 404 and "POST /v1/text-classification" in out["error"]["message"]
    # each model has its own batcher: batches are counted per model
    values = _metrics(multi.request("GET", "/metrics", headers=AUTH)[2].decode())
    assert values[("bertexport_batch_texts_sum", 'model="sentiment"')] >= len(texts)
    assert values[("bertexport_batch_texts_sum", 'model="embed"')] >= 3
    assert values[("bertexport_queue_depth", 'model="reranker"')] == 0


RERANK_ENDPOINT = "/v1/rerank"


def test_rerank_scores_equal_run_on_the_pairs_and_are_sorted(multi, rerankers):
    """2-logit head: the score is softmax's `relevant` class, exactly `run --context`'s
    probability of that label for the same (query, document) pair (the long document is
    windowed the same way)."""
    art, _ = rerankers["reranker"]
    status, _, out = multi.post(RERANK_ENDPOINT, {"model": "reranker", "query": QUERY, "documents": DOCUMENTS,
                                                  "return_documents": True}, headers=AUTH)
    assert status == 200 and out["model"] == "reranker" and out["usage"]["total_tokens"] > 0
    results = out["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    assert all(r["document"] == {"text": DOCUMENTS[r["index"]]} for r in results)
    ran = {}
    for i, doc in enumerate(DOCUMENTS):
        (row,) = run_json(art, [QUERY], doc, "--top-k", "2")
        ran[i] = next(s["score"] for s in row["scores"] if s["label"] == "relevant")
    same_answers({r["index"]: r["relevance_score"] for r in results}, ran, manifest_of(art))
    # top_n keeps the best ones; documents are left out unless asked for
    status, _, out = multi.post(RERANK_ENDPOINT, {"model": "reranker", "query": QUERY, "documents": DOCUMENTS,
                                                  "top_n": 2}, headers=AUTH)
    assert status == 200 and [r["index"] for r in out["results"]] == [r["index"] for r in results[:2]]
    assert all("document" not in r for r in out["results"])


def test_rerank_one_logit_head_is_its_sigmoid(multi, rerankers):
    """1-logit head: the score is the sigmoid of the logit PyTorch computes for the pair."""
    import torch
    import transformers as T

    _, ckpt = rerankers["reranker-1"]
    docs = DOCUMENTS[:4] + DOCUMENTS[5:]  # short ones: one window each, as PyTorch sees them
    status, _, out = multi.post(RERANK_ENDPOINT, {"model": "reranker-1", "query": QUERY, "documents": docs}, headers=AUTH)
    assert status == 200
    tok = T.AutoTokenizer.from_pretrained(ckpt)
    model = T.AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    with torch.no_grad():
        logits = model(**tok([QUERY] * len(docs), docs, padding=True, return_tensors="pt")).logits[:, 0].double()
    expected = torch.sigmoid(logits).tolist()
    got = {r["index"]: r["relevance_score"] for r in out["results"]}
    assert [round(got[i], 5) for i in range(len(docs))] == [round(e, 5) for e in expected]
    assert [r["index"] for r in out["results"]] == sorted(range(len(docs)), key=lambda i: -got[i])


def test_tei_rerank_shape_has_the_same_scores(multi):
    """TEI's `/rerank`: `texts` -> a bare list of {index, score[, text]}, best first; the scores
    are `/v1/rerank`'s; `raw_scores` gives the log-odds whose sigmoid they are."""
    listening = next(line for line in multi.log.read_text().splitlines() if line.startswith("serving "))
    assert "POST /v1/rerank" in listening and "POST /rerank" in listening  # the start-up line says so
    for model in ("reranker", "reranker-1"):
        status, _, ours = multi.post(RERANK_ENDPOINT, {"model": model, "query": QUERY, "documents": DOCUMENTS}, headers=AUTH)
        assert status == 200
        status, _, tei = multi.post("/rerank", {"model": model, "query": QUERY, "texts": DOCUMENTS, "return_text": True},
                                    headers=AUTH)
        assert status == 200 and isinstance(tei, list)
        assert [(r["index"], r["score"]) for r in tei] == [(r["index"], r["relevance_score"]) for r in ours["results"]]
        assert all(r["text"] == DOCUMENTS[r["index"]] for r in tei)
        status, _, raw = multi.post("/rerank", {"model": model, "query": QUERY, "texts": DOCUMENTS, "raw_scores": True},
                                    headers=AUTH)
        assert status == 200 and [r["index"] for r in raw] == [r["index"] for r in tei] and "text" not in raw[0]
        for r, t in zip(raw, tei):
            assert abs(1 / (1 + math.exp(-r["score"])) - t["score"]) < 1e-9
    # several rerankers served and none named: said, naming them
    status, _, out = multi.post("/rerank", {"query": QUERY, "texts": DOCUMENTS}, headers=AUTH)
    assert status == 400 and "'reranker', 'reranker-1'" in out["error"]["message"]
    status, _, out = multi.post("/rerank", {"model": "reranker", "query": QUERY, "texts": DOCUMENTS, "raw_scores": 1},
                                headers=AUTH)
    assert status == 400 and "'raw_scores' must be true or false" in out["error"]["message"]


def test_rerank_refusals_say_why(multi):
    for model, needle in [("sentiment", "its head has 3 labels (negative, neutral, positive)"),
                          ("embed", "it is a feature-extraction model")]:
        status, _, out = multi.post(RERANK_ENDPOINT, {"model": model, "query": "q", "documents": ["d"]}, headers=AUTH)
        assert status == 400 and out["error"]["code"] == "not_a_reranker" and needle in out["error"]["message"], out
    for body, needle in [({"query": "q", "documents": []}, "'documents' must be a non-empty list"),
                         ({"query": "q", "documents": "one document"}, "'documents' must be a non-empty list"),
                         ({"query": "", "documents": ["d"]}, "'query' is empty"),
                         ({"query": "q", "documents": ["d"], "top_n": 0}, "'top_n' must be a positive integer"),
                         ({"query": "q", "documents": ["d"], "return_documents": "yes"}, "'return_documents'"),
                         ({"query": "museum " * 120, "documents": ["d"]}, "the query has 122 tokens")]:
        status, _, out = multi.post(RERANK_ENDPOINT, {"model": "reranker"} | body, headers=AUTH)
        assert status == 400 and needle in out["error"]["message"], (body, out)


def test_api_key_none_wrong_right_and_open_probes(multi):
    body = {"model": "sentiment", "inputs": ["a film"]}
    status, headers, out = multi.post("/v1/text-classification", body)
    assert status == 401 and out["error"]["code"] == "missing_api_key" and headers["www-authenticate"] == "Bearer"
    assert set(out["error"]) == {"message", "type", "param", "code"}
    for wrong in [f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer ", f"Basic {KEY}", KEY]:
        status, _, out = multi.post("/v1/text-classification", body, headers={"Authorization": wrong})
        assert status == 401 and out["error"]["code"] in ("invalid_api_key", "missing_api_key"), wrong
    assert multi.post("/v1/text-classification", body, headers={"Authorization": f"bearer {KEY}"})[0] == 200
    for path in ["/v1/models", "/metrics", "/v2/anything"]:  # everything else is behind the key, unknown paths too
        assert multi.request("GET", path)[0] == 401
    for path in ["/health", "/ready"]:  # probes: an orchestrator has no key
        status, _, raw = multi.request("GET", path)
        assert status == 200, path
    assert json.loads(multi.request("GET", "/ready")[2])["models"] == ["embed", "sentiment", "reranker", "reranker-1"]


def test_openai_client_with_the_key(multi, artifacts):
    import openai

    client = openai.OpenAI(base_url=multi.url + "/v1", api_key=KEY, max_retries=0)
    res = client.embeddings.create(model="embed", input=["a film"], encoding_format="float")
    (ran,) = run_json(artifacts["feature-extraction"], ["a film"])
    same_answers(res.data[0].embedding, ran["embedding"], manifest_of(artifacts["feature-extraction"]))
    assert [m.id for m in client.models.list().data][0] == "embed"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=multi.url + "/v1", api_key="sk-wrong", max_retries=0).embeddings.create(
            model="embed", input=["a film"])


def test_key_from_a_file_and_open_metrics(artifacts, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    server = Server(artifacts["text-classification"], "--api-key-file", key_file, "--metrics-open",
                    log=tmp_path / "keyfile.log").wait_listening()
    try:
        assert server.request("GET", "/metrics")[0] == 200
        assert server.post("/v1/text-classification", {"inputs": ["a film"]})[0] == 401
        assert server.post("/v1/text-classification", {"inputs": ["a film"]}, headers=AUTH)[0] == 200
    finally:
        assert server.stop() == 143


def test_refused_before_anything_loads(artifacts, tmp_path):
    """Duplicate names, extra names and bad keys: exit 2, one line, nothing served."""
    art, other = artifacts["text-classification"], artifacts["feature-extraction"]
    empty = tmp_path / "empty-key"
    empty.write_text("\n")
    cases = [([art, art], "two artifacts are named 'text-classification'"),
             ([art, other, "--model-name", "m", "--model-name", "m"], "two artifacts are named 'm'"),
             ([art, "--model-name", "a", "--model-name", "b"], "2 --model-name for 1 artifact"),
             ([art, "--api-key", KEY, "--api-key-file", empty], "not both"),
             ([art, "--api-key-file", empty], "is empty"),
             ([art, "--api-key-file", tmp_path / "missing"], "cannot read the API key file"),
             ([art, "--api-key", " padded "], "white space")]
    for args, needle in cases:
        r = CliRunner().invoke(cli, ["serve", *map(str, args), "--port", "0"], env={"BERTEXPORT_API_KEY": None})
        assert r.exit_code == 2 and needle in r.output and "serving" not in r.output, (args, r.output)


def test_threads_split_between_models():
    from bertexport.core.envinfo import cpu_count
    from bertexport.shipping.model_routing import threads_per_model

    assert threads_per_model(1, None) is None and threads_per_model(3, 2) == 2
    assert threads_per_model(2, None) == max(1, cpu_count() // 2) and threads_per_model(64, None) == 1


def test_batcher_never_mixes_modes():
    from bertexport.shipping.batching import Batcher

    calls = []
    b = Batcher(lambda t, p: calls.append(("predict", list(t))) or list(t),
                lambda t, p: [1] * len(t), max_batch_tokens=100, max_wait=0.2, queue_size=10,
                modes={"rerank": lambda t, p: calls.append(("rerank", list(t))) or [x + "!" for x in t]})
    futures = [b.submit(["a"]), b.submit(["b"], ["x"], mode="rerank"), b.submit(["c"], ["y"], mode="rerank"), b.submit(["d"])]
    with pytest.raises(ValueError, match="unknown mode"):
        b.submit(["e"], mode="nope")
    b.start()
    assert [f.result(5)[0] for f in futures] == [["a"], ["b!"], ["c!"], ["d"]]
    b.stop(5)
    assert calls == [("predict", ["a"]), ("rerank", ["b", "c"]), ("predict", ["d"])]


# -- the container --------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def test_dockerfile_promises():
    """Parsed (the `dockerfile` package: BuildKit's own parser) and its promises checked."""
    commands = parse_dockerfile(REPO / "Dockerfile")
    final = [c for c in commands if c.cmd == "FROM"][-1]
    last_stage = commands[commands.index(final):]
    by = {}
    for c in last_stage:
        by.setdefault(c.cmd, []).append(c)
    install = " ".join(" ".join(c.value) for c in by["RUN"])
    assert "[runtime,serve]" in install and "bertexport-*.whl" in install and "torch" not in install.replace(
        "find_spec('torch')", "")
    assert by["USER"][-1].value[0] not in ("root", "0") and "useradd" in install
    (health,) = by["HEALTHCHECK"]
    assert health.value[0] == "CMD" and "urllib.request" in " ".join(health.value) and "/health" in " ".join(health.value)
    assert by["EXPOSE"][0].value == ("8000",)
    assert list(by["ENTRYPOINT"][0].value[:2]) == ["bertexport", "serve"] and by["CMD"][0].value == ("/models",)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    # the extras it installs never pull torch or transformers
    import importlib.metadata
    import re

    reqs = importlib.metadata.requires("bertexport") or []
    pulled = [r for r in reqs if re.search(r'extra == "(runtime|serve)"', r) or "extra ==" not in r]
    assert pulled and not [r for r in pulled if re.match(r"(torch|transformers|optimum)\b", r)]


def test_dockerfile_builds():
    """Built when a Docker engine answers (not on this project's machines: docker's client
    is installed, its daemon is not running)."""
    if not _docker_engine():
        pytest.skip("no Docker engine here: the Dockerfile is parsed and checked (test_dockerfile_promises), not built")
    r = subprocess.run(["docker", "build", "-q", "-t", "bertexport-serve-test", str(REPO)], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
