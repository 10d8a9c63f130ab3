"""``bertexport serve``: one artifact behind HTTP, torch-free (Starlette + uvicorn).

The artifact is verified (checksums, manifest digest, and its signature when a trusted
key is given) and loaded before the port opens. Endpoints follow the task record:

- ``POST /v1/embeddings`` (feature-extraction): OpenAI's request and response shape, so
  the official ``openai`` client works with ``base_url``;
- ``POST /v1/<task>`` (every task): ``{"inputs": str | [str], "context": ...}`` ->
  ``{"results": [...]}``, each result exactly one line of ``bertexport run --json``;
- ``GET /v1/models``, ``/health`` (the process answers), ``/ready`` (model loaded,
  inference thread running), ``/metrics`` (Prometheus text format).

Requests go through ``serve_batching.Batcher`` (one inference thread, a bounded queue,
coalescing up to a token budget or a maximum wait) into ``Predictor.predict``: the same
windowing, batching by length and post-processing as ``run``. Bad requests get a 4xx JSON
error (OpenAI's ``{"error": {...}}`` shape) and never reach the model; a full queue gets
503 with ``Retry-After``. On SIGTERM uvicorn stops accepting, lets in-flight requests
finish, and the command exits 143.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bertexport.core.errors import BertExportError, UserError
from bertexport.shipping.batching import Batcher, BatchStats, QueueFull

log = logging.getLogger("bertexport.shipping.serve")

EMBEDDINGS = "/v1/embeddings"
# Windows per inference call. Coalesced windows are sorted by length and cut into batches of
# this many: on CPU, short sorted batches win (less padding); measured on MiniLM ort-int8 with
# Rotten Tomatoes snippets on a shared 2-core EPYC, CPU time per text: alone 11.9 ms, 32
# coalesced in batches of 8 9.9 ms, in one batch of 32 17.5 ms.
SERVE_BATCH_SIZE = 8


@dataclass(frozen=True)
class ServeOptions:
    """Limits and batching of one server (the CLI's options; defaults are the CLI's)."""

    max_batch_tokens: int = 4096  # coalesce requests until their texts hold this many tokens...
    max_wait_ms: float = 2.0  # ...or the oldest has waited this long
    queue_size: int = 256  # requests waiting for the inference thread; more -> 503
    max_texts: int = 256  # texts in one request
    max_chars: int = 200_000  # characters in one request (all texts, and QA contexts)
    max_body_bytes: int = 4 << 20  # request body
    retry_after_s: int = 1

    def check(self) -> None:
        for name in ("max_batch_tokens", "queue_size", "max_texts", "max_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1")
        if self.max_wait_ms < 0:
            raise UserError("max-wait-ms must be >= 0")


# Served answers come from batches of other requests' texts; an artifact whose outputs move
# with their batch (manifest["batch_invariance"], measured by convert) matches `run` within
# its measured tolerance, and within this one when the manifest has no measurement.
DEFAULT_BATCH_TOLERANCE = 1e-4


def batch_tolerance(manifest: dict) -> float:
    """0.0 when the artifact was measured batch-invariant (answers equal `run`'s bit for bit),
    else the absolute tolerance on any number in an answer."""
    inv = manifest.get("batch_invariance") or {}
    if inv.get("invariant"):
        return 0.0
    return float(inv.get("tolerance") or DEFAULT_BATCH_TOLERANCE)


class ApiError(Exception):
    """An answer other than 200, said as OpenAI's error body."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# -- metrics ------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics of one server, in a registry of its own."""

    def __init__(self, queue_depth: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("bertexport_requests", "HTTP requests answered", ["endpoint", "code"], registry=r)
        self.errors = Counter("bertexport_request_errors", "HTTP requests answered with an error (4xx/5xx)",
                              ["endpoint", "code"], registry=r)
        self.latency = Histogram("bertexport_request_duration_seconds", "Time from request to answer", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.in_flight = Gauge("bertexport_requests_in_flight", "Inference requests being answered", registry=r)
        Gauge("bertexport_queue_depth", "Requests waiting for the inference thread", registry=r).set_function(queue_depth)
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
        self.batch_requests = Histogram("bertexport_batch_requests", "Requests coalesced into one inference batch",
                                        buckets=sizes, registry=r)
        self.batch_texts = Histogram("bertexport_batch_texts", "Texts in one inference batch", buckets=sizes, registry=r)
        self.batch_tokens = Histogram("bertexport_batch_tokens", "Tokens in one inference batch",
                                      buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536), registry=r)
        self.batch_seconds = Histogram("bertexport_batch_duration_seconds", "Inference time of one batch",
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)

    def on_batch(self, b: BatchStats) -> None:
        self.batch_requests.observe(b.requests)
        self.batch_texts.observe(b.texts)
        self.batch_tokens.observe(b.tokens)
        self.batch_seconds.observe(b.seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Measured:
    """ASGI middleware: counts, times and labels every request by endpoint (unknown paths
    are one label, so random URLs cannot grow the metrics)."""

    def __init__(self, app, metrics: Metrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        posted = scope["method"] == "POST"
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        if posted:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            if posted:
                self.metrics.in_flight.dec()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(endpoint, str(status)).inc()


# -- request parsing ------------------------------------------------------------------------

async def _read_json(request, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "Content-Length is not a number")
        if int(length) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="body_too_large")
    if not body:
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _texts(value, param: str, opts: ServeOptions, *, allow_list: bool = True) -> list[str]:
    """A string or a non-empty list of strings, each with a non-space character, within the limits."""
    if isinstance(value, str):
        texts = [value]
    elif allow_list and isinstance(value, list) and value and all(isinstance(t, str) for t in value):
        texts = value
    elif isinstance(value, list) and value and all(isinstance(t, (int, list)) and not isinstance(t, bool) for t in value):
        raise ApiError(400, f"'{param}' holds token ids: this server takes text", param=param)
    elif value is None:
        raise ApiError(400, f"'{param}' is missing", param=param)
    else:
        raise ApiError(400, f"'{param}' must be a string{' or a non-empty list of strings' if allow_list else ''}",
                       param=param)
    if len(texts) > opts.max_texts:
        raise ApiError(400, f"'{param}' has {len(texts)} texts; at most {opts.max_texts} per request", param=param,
                       code="too_many_texts")
    for i, t in enumerate(texts):
        where = f"{param}[{i}]" if len(texts) > 1 or isinstance(value, list) else param
        if not t.strip():
            raise ApiError(400, f"'{where}' is empty: every text needs a non-space character", param=param)
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"'{where}' is not valid Unicode (a lone surrogate)", param=param) from None
    return texts


def _check_chars(opts: ServeOptions, *groups: list[str]) -> None:
    total = sum(len(t) for g in groups for t in g)
    if total > opts.max_chars:
        raise ApiError(400, f"the request holds {total} characters; at most {opts.max_chars}", code="too_many_characters")


# -- the application --------------------------------------------------------------------------

class Service:
    """What the endpoints share: the predictor behind its batcher, the limits, the metrics."""

    def __init__(self, predictor, options: ServeOptions, model_name: str):
        self.predictor = predictor
        self.options = options
        self.model_name = model_name
        self.task = predictor.task.name
        self.manifest = predictor.art.manifest
        self.metrics = Metrics(lambda: self.batcher.depth)
        self.batcher = Batcher(predictor.predict, token_counter(predictor), max_batch_tokens=options.max_batch_tokens,
                               max_wait=options.max_wait_ms / 1000, queue_size=options.queue_size,
                               on_batch=self.metrics.on_batch)
        self.created = _unix_time(self.manifest.get("created"))

    async def infer(self, texts: list[str], pairs: list[str] | None = None):
        try:
            fut = self.batcher.submit(texts, pairs)
        except QueueFull:
            raise ApiError(503, "the server is busy (its request queue is full): retry later", kind="server_busy",
                           code="queue_full", headers={"Retry-After": str(self.options.retry_after_s)}) from None
        try:
            return await asyncio.wrap_future(fut)
        except BertExportError as e:
            raise ApiError(422, str(e)) from None
        except Exception as e:  # a bug: the client gets one line, the log the traceback
            log.exception("inference failed")
            raise ApiError(500, f"internal error: {type(e).__name__} (see the server log)", kind="server_error") from None

    def wrong_endpoint(self) -> ApiError:
        path = EMBEDDINGS if self.task == "feature-extraction" else f"/v1/{self.task}"
        return ApiError(404, f"this server serves a {self.task} model: POST {path}", code="wrong_endpoint")


def _unix_time(iso: str | None) -> int:
    try:
        return int(dt.datetime.fromisoformat(iso).timestamp()) if iso else 0
    except ValueError:
        return 0


def token_counter(predictor) -> Callable[[list[str], list[str] | None], list[int]]:
    """Tokens per text (special tokens included, nothing truncated): usage counts and the
    batching budget. A copy of the artifact's tokenizer: the predictor's own changes its
    truncation settings as it windows."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(predictor.art.encoder.tokenizer.to_str())
    tok.no_truncation()
    tok.no_padding()

    def count(texts, pairs=None):
        items = list(zip(texts, pairs)) if pairs is not None else list(texts)
        return [len(e.ids) for e in tok.encode_batch(items)]

    return count


def build_app(predictor, options: ServeOptions, model_name: str):
    """The Starlette application serving ``predictor``; its batcher runs while the app's
    lifespan does."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from bertexport.core.tasks import TASKS

    svc = Service(predictor, options, model_name)

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def embeddings(request):
        if svc.task != "feature-extraction":
            raise svc.wrong_endpoint()
        data = await _read_json(request, options.max_body_bytes)
        model = data.get("model")
        if model is not None and model != svc.model_name:
            raise ApiError(404, f"model '{model}' is not served here; this server serves '{svc.model_name}'",
                           param="model", code="model_not_found")
        fmt = data.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        dims = data.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool)):
            raise ApiError(400, "'dimensions' must be an integer", param="dimensions")
        texts = _texts(data.get("input"), "input", options)
        _check_chars(options, texts)
        results, tokens = await svc.infer(texts)
        width = len(results[0]["embedding"])
        if dims is not None and dims != width:
            raise ApiError(400, f"this model's embeddings have {width} dimensions; 'dimensions' must be {width} or absent",
                           param="dimensions")
        rows = []
        for i, r in enumerate(results):
            vec = r["embedding"]
            if fmt == "base64":
                vec = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
            rows.append({"object": "embedding", "index": i, "embedding": vec})
        used = int(sum(tokens))
        return JSONResponse({"object": "list", "data": rows, "model": svc.model_name,
                             "usage": {"prompt_tokens": used, "total_tokens": used}})

    def task_endpoint(task: str):
        async def predict(request):
            if task != svc.task:
                raise svc.wrong_endpoint()
            data = await _read_json(request, options.max_body_bytes)
            texts = _texts(data.get("inputs"), "inputs", options)
            pairs = None
            if svc.predictor.task.needs_pair:
                ctx = data.get("context")
                if isinstance(ctx, list):
                    pairs = _texts(ctx, "context", options)
                    if len(pairs) != len(texts):
                        raise ApiError(400, f"'context' has {len(pairs)} texts for {len(texts)} questions", param="context")
                else:
                    pairs = _texts(ctx, "context", options, allow_list=False) * len(texts)
                _check_chars(options, texts, pairs[:1] if not isinstance(ctx, list) else pairs)
            elif data.get("context") is not None:
                raise ApiError(400, f"'context' is for question-answering; this model does {svc.task}", param="context")
            else:
                _check_chars(options, texts)
            results, tokens = await svc.infer(texts, pairs)
            rows = [{"index": i, "text_prefix": t[:40], **r} for i, (t, r) in enumerate(zip(texts, results))]
            used = int(sum(tokens))
            return JSONResponse({"model": svc.model_name, "task": svc.task, "results": rows,
                                 "usage": {"prompt_tokens": used, "total_tokens": used}})
        return predict

    async def models(request):
        return JSONResponse({"object": "list", "data": [{
            "id": svc.model_name, "object": "model", "created": svc.created, "owned_by": "bertexport",
            "task": svc.task, "target": svc.manifest["target"]["name"],
            "source": (svc.manifest.get("source") or {}).get("source"), "max_length": svc.manifest["max_length"]}]})

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def ready(request):
        if not svc.batcher.alive:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready", "model": svc.model_name, "task": svc.task})

    async def metrics(request):
        body, content_type = svc.metrics.render()
        return Response(body, media_type=content_type)

    async def http_error(request, exc: HTTPException):
        messages = {404: f"no such endpoint: {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        e = ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail)), code="not_found"
                     if exc.status_code == 404 else None, headers=dict(exc.headers or {}))
        return error(e)

    async def api_error(request, exc: ApiError):
        return error(exc)

    async def server_error(request, exc: Exception):
        log.error("unhandled error on %s: %s", request.url.path, exc, exc_info=exc)
        return error(ApiError(500, "internal error (see the server log)", kind="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        svc.batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(svc.batcher.stop)  # answers whatever is still queued

    routes = [Route(EMBEDDINGS, embeddings, methods=["POST"])]
    routes += [Route(f"/v1/{t}", task_endpoint(t), methods=["POST"]) for t in TASKS]
    routes += [Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
               Route("/ready", ready, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.service = svc
    return _Measured(app, svc.metrics, {r.path for r in routes})


# -- the process -------------------------------------------------------------------------------

def _require_stack():
    missing = []
    for name in ("starlette", "uvicorn", "prometheus_client"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"serve needs {', '.join(missing)}: pip install 'bertexport[serve]'")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line UserError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(artifact: str | Path, *, host: str = "127.0.0.1", port: int = 8000, trusted_key=None, threads: int | None = None,
          model_name: str | None = None, options: ServeOptions = ServeOptions(), predictor_options: dict | None = None,
          grace_seconds: float = 30.0, on_listening: Callable[[str, object], None] | None = None) -> None:
    """Verify and load ``artifact``, then serve it on host:port until SIGINT/SIGTERM.

    Everything that can be refused is refused before the port opens (``UserError``). On a
    signal uvicorn stops accepting, waits up to ``grace_seconds`` for in-flight requests,
    and re-raises the signal once it is done (the CLI maps it to 130/143)."""
    from bertexport.shipping.runtime import Artifact, Predictor

    options.check()
    _require_stack()
    import uvicorn

    art = Artifact(artifact, threads=threads, trusted_key=trusted_key)  # checksums, digest, signature
    with art:
        predictor = Predictor(art, **({"batch_size": SERVE_BATCH_SIZE} | (predictor_options or {})))
        name = model_name or Path(artifact).resolve().name
        app = build_app(predictor, options, name)
        sock = listen(host, port)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=grace_seconds, server_header=False)
        server = uvicorn.Server(config)
        if on_listening is not None:
            on_listening(url_of(sock), art)
        server.run(sockets=[sock])
