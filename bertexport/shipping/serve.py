"""``bertexport serve``: artifacts behind HTTP, torch-free (Starlette + uvicorn).

Every artifact is verified (checksums, manifest digest, and its signature when a trusted
key is given) and loaded before the port opens. Several artifacts are served by one
process, routed by the request's ``model`` (each artifact's name: ``--model-name`` or its
folder's name). Endpoints follow each model's task record:

- ``POST /v1/embeddings`` (feature-extraction): OpenAI's request and response shape, so
  the official ``openai`` client works with ``base_url``;
- ``POST /v1/<task>`` (every task): ``{"inputs": str | [str], "context": ...}`` ->
  ``{"results": [...]}``, each result exactly one line of ``bertexport run --json``;
- ``POST /v1/rerank`` (a text-classification model with a 1- or 2-logit relevance head, a
  cross-encoder): the request/response shape of Cohere's, Jina's and infinity's rerank APIs;
- ``GET /v1/models``, ``/health`` (the process answers), ``/ready`` (models loaded,
  inference threads running), ``/metrics`` (Prometheus text format).

Requests go through each model's own ``batching.Batcher`` (one inference thread per model,
a bounded queue, coalescing up to a token budget or a maximum wait) into
``Predictor.predict``: the same windowing, batching by length and post-processing as
``run``. Bad requests get a 4xx JSON error (OpenAI's ``{"error": {...}}`` shape) and never
reach a model; a full queue gets 503 with ``Retry-After``. With an API key every endpoint
but ``/health`` and ``/ready`` (and ``/metrics`` when told) needs ``Authorization: Bearer
KEY``. On SIGTERM uvicorn stops accepting, lets in-flight requests finish, and the command
exits 143.

``build_app(models, options, access=..., predictor_options=...)`` builds the ASGI app from
a list of ``(name, Artifact)``: ``serve`` runs it under uvicorn, and any other ASGI host
(Ray Serve) can run the same app.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import os
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bertexport.core.envinfo import cpu_count
from bertexport.core.errors import BertExportError, UserError
from bertexport.shipping.batching import Batcher, BatchStats, QueueFull

log = logging.getLogger("bertexport.shipping.serve")

EMBEDDINGS = "/v1/embeddings"
RERANK = "/v1/rerank"
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
    """Prometheus metrics of one server, in a registry of its own. Request metrics are
    labelled by endpoint (and status code), batch and queue metrics by model."""

    def __init__(self, queue_depths: Callable[[], dict[str, int]]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import GaugeMetricFamily

        self.registry = r = CollectorRegistry()
        self.requests = Counter("bertexport_requests", "HTTP requests answered", ["endpoint", "code"], registry=r)
        self.errors = Counter("bertexport_request_errors", "HTTP requests answered with an error (4xx/5xx)",
                              ["endpoint", "code"], registry=r)
        self.latency = Histogram("bertexport_request_duration_seconds", "Time from request to answer", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.in_flight = Gauge("bertexport_requests_in_flight", "Inference requests being answered", registry=r)

        class QueueDepth:
            def collect(self):
                g = GaugeMetricFamily("bertexport_queue_depth", "Requests waiting for a model's inference thread",
                                      labels=["model"])
                for name, depth in queue_depths().items():
                    g.add_metric([name], depth)
                yield g

        r.register(QueueDepth())
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
        self.batch_requests = Histogram("bertexport_batch_requests", "Requests coalesced into one inference batch",
                                        ["model"], buckets=sizes, registry=r)
        self.batch_texts = Histogram("bertexport_batch_texts", "Texts in one inference batch", ["model"], buckets=sizes,
                                     registry=r)
        self.batch_tokens = Histogram("bertexport_batch_tokens", "Tokens in one inference batch", ["model"],
                                      buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 65536), registry=r)
        self.batch_seconds = Histogram("bertexport_batch_duration_seconds", "Inference time of one batch", ["model"],
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)

    def on_batch(self, model: str) -> Callable[[BatchStats], None]:
        def observe(b: BatchStats) -> None:
            self.batch_requests.labels(model).observe(b.requests)
            self.batch_texts.labels(model).observe(b.texts)
            self.batch_tokens.labels(model).observe(b.tokens)
            self.batch_seconds.labels(model).observe(b.seconds)
        return observe

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


# -- access ------------------------------------------------------------------------------------

API_KEY_ENV = "BERTEXPORT_API_KEY"
OPEN_PATHS = frozenset({"/health", "/ready"})  # probes: an orchestrator has no key


@dataclass(frozen=True)
class Access:
    """Who may call the server: with ``api_key`` every request but the probes (and
    ``/metrics`` when ``metrics_open``) must send ``Authorization: Bearer <api_key>``."""

    api_key: str | None = None
    metrics_open: bool = False

    def check(self) -> None:
        if self.api_key is not None and (not self.api_key.strip() or self.api_key != self.api_key.strip()):
            raise UserError("the API key is empty or starts/ends with white space")


def read_api_key(key: str | None, key_file: str | Path | None) -> str | None:
    """The API key from ``--api-key`` (or its environment variable) or ``--api-key-file``
    (its first line), or None; a UserError for both, an unreadable file or an empty key."""
    if key is not None and key_file is not None:
        raise UserError(f"give --api-key (or {API_KEY_ENV}) or --api-key-file, not both")
    if key_file is not None:
        path = Path(key_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the API key file {path}: {getattr(e, 'strerror', None) or e}") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise UserError(f"the API key file {path} is empty")
    if key is not None:
        Access(api_key=key).check()
    return key


class _Keyed:
    """ASGI middleware: refuses a request without the right bearer key with 401 in OpenAI's
    error shape. The key is compared in constant time (``hmac.compare_digest`` of sha256
    digests, so not even its length leaks)."""

    def __init__(self, app, access: Access):
        self.app = app
        self.digest = hashlib.sha256(access.api_key.encode("utf-8")).digest()
        self.open_paths = OPEN_PATHS | ({"/metrics"} if access.metrics_open else set())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        token = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    token = credentials.strip()
        if token and hmac.compare_digest(hashlib.sha256(token).digest(), self.digest):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        if token is None:
            e = ApiError(401, "this server needs an API key: send the header 'Authorization: Bearer <key>'",
                         code="missing_api_key")
        else:
            e = ApiError(401, "incorrect API key", code="invalid_api_key")
        await JSONResponse(e.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


# -- reranking -----------------------------------------------------------------------------------

def relevance_head(manifest: dict, id2label: dict | None) -> tuple[int | None, str | None]:
    """(logits, None) for an artifact that can rerank, (None, why not) otherwise.

    A cross-encoder is a sequence classifier over (query, document) pairs with one relevance
    logit (sentence-transformers' CrossEncoder, ms-marco, bge-reranker) or two (not relevant,
    relevant). The manifest does not record what the model was trained on, so a 1- or 2-logit
    text classifier is taken as one; anything else is refused, saying why."""
    task = manifest["task"]
    if task != "text-classification":
        return None, (f"it is a {task} model; reranking needs a cross-encoder: a text-classification model "
                      "trained on (query, document) pairs")
    width = len(id2label) if id2label else None
    if width is None:
        shape = next((o.get("shape") for o in manifest.get("outputs") or [] if o.get("name") == "logits"), None)
        width = shape[-1] if shape and isinstance(shape[-1], int) else None
    if width not in (1, 2):
        labels = f" ({', '.join(map(str, id2label.values()))})" if id2label else ""
        return None, (f"its head has {width} labels{labels}; a cross-encoder has one relevance logit "
                      "or two (not relevant, relevant)")
    return width, None


def relevance(logits: np.ndarray) -> float:
    """The relevance score of one (query, document) pair from its head's logits: sigmoid of
    the logit for a 1-logit head, softmax's second (relevant) class for a 2-logit head —
    the latter exactly ``run``'s probability of label 1 for the same pair."""
    from bertexport.core.tasks import softmax

    z = np.asarray(logits, dtype=np.float64)
    if z.shape[-1] == 1:
        return float(1.0 / (1.0 + np.exp(-z[0])))
    return float(softmax(z)[1])


def reranker(predictor):
    """A copy of ``predictor`` whose answers are ``{"relevance_score": float}``: the same
    pair encoding, windowing of long documents and batching as ``run --context``; windows of
    one document are combined as ``run`` does (``mean``: their logits averaged; ``max``: the
    best window's score)."""
    def aggregate(text, pair, windows, post):
        stack = np.stack(windows)
        if post.aggregation == "max":
            return {"relevance_score": max(relevance(w) for w in stack), "windows": len(windows)}
        return {"relevance_score": relevance(stack.mean(0)), "windows": len(windows)}

    r = copy.copy(predictor)
    r.task = dataclasses.replace(predictor.task, aggregate=aggregate)
    return r


# -- the application --------------------------------------------------------------------------

class ServedModel:
    """One artifact served: its predictor behind its own batcher (queue and thread)."""

    def __init__(self, name: str, predictor, options: ServeOptions, metrics: Metrics):
        self.name = name
        self.predictor = predictor
        self.options = options
        self.task = predictor.task.name
        self.manifest = predictor.art.manifest
        self.created = _unix_time(self.manifest.get("created"))
        self.rerank_logits, self.rerank_refusal = relevance_head(self.manifest, predictor.art.id2label)
        modes = {"rerank": reranker(predictor).predict} if self.rerank_logits else {}
        self.batcher = Batcher(predictor.predict, token_counter(predictor), max_batch_tokens=options.max_batch_tokens,
                               max_wait=options.max_wait_ms / 1000, queue_size=options.queue_size,
                               on_batch=metrics.on_batch(name), modes=modes, name=name)
        self._count = token_counter(predictor)  # the event loop's own copy (the batcher's is its thread's)

    def count_tokens(self, texts, pairs=None) -> list[int]:
        return self._count(texts, pairs)

    async def infer(self, texts: list[str], pairs: list[str] | None = None, mode: str | None = None):
        try:
            fut = self.batcher.submit(texts, pairs, mode)
        except QueueFull:
            raise ApiError(503, f"the server is busy (model '{self.name}''s request queue is full): retry later",
                           kind="server_busy", code="queue_full",
                           headers={"Retry-After": str(self.options.retry_after_s)}) from None
        try:
            return await asyncio.wrap_future(fut)
        except BertExportError as e:
            raise ApiError(422, str(e)) from None
        except Exception as e:  # a bug: the client gets one line, the log the traceback
            log.exception("inference failed")
            raise ApiError(500, f"internal error: {type(e).__name__} (see the server log)", kind="server_error") from None

    def endpoint(self) -> str:
        return EMBEDDINGS if self.task == "feature-extraction" else f"/v1/{self.task}"

    def describe(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "bertexport", "task": self.task,
                "target": self.manifest["target"]["name"], "source": (self.manifest.get("source") or {}).get("source"),
                "max_length": self.manifest["max_length"], "endpoints": [self.endpoint()]
                + ([RERANK] if self.rerank_logits else [])}


class Service:
    """What the endpoints share: the served models by name, the limits, the metrics."""

    def __init__(self, predictors: Sequence[tuple[str, object]], options: ServeOptions):
        if not predictors:
            raise UserError("nothing to serve: give at least one artifact")
        check_names([name for name, _ in predictors])
        self.options = options
        self.metrics = Metrics(lambda: {name: m.batcher.depth for name, m in self.models.items()})
        self.models: dict[str, ServedModel] = {name: ServedModel(name, p, options, self.metrics) for name, p in predictors}

    def served(self) -> str:
        return ", ".join(f"'{n}'" for n in self.models)

    def pick(self, data: dict) -> ServedModel:
        """The model a request names (or the only one served)."""
        name = data.get("model")
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise ApiError(400, f"'model' is missing: this server serves {self.served()}", param="model",
                           code="model_required")
        if not isinstance(name, str):
            raise ApiError(400, f"'model' must be a string: this server serves {self.served()}", param="model")
        if name not in self.models:
            raise ApiError(404, f"model '{name}' is not served here; this server serves {self.served()}", param="model",
                           code="model_not_found")
        return self.models[name]

    def wrong_endpoint(self, model: ServedModel) -> ApiError:
        return ApiError(404, f"model '{model.name}' is a {model.task} model: POST {model.endpoint()}",
                        code="wrong_endpoint")


def check_names(names: Sequence[str]) -> None:
    """Model names must be unique and non-empty (refused before anything loads)."""
    seen = set()
    for n in names:
        if not n or not n.strip():
            raise UserError("a model name is empty")
        if n in seen:
            raise UserError(f"two artifacts are named '{n}': give each its own --model-name")
        seen.add(n)


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


def _documents(value, opts: ServeOptions) -> list[str]:
    """Rerank documents: a non-empty list of strings (or of ``{"text": str}``, Cohere's older form)."""
    if isinstance(value, list) and value and all(isinstance(d, dict) and isinstance(d.get("text"), str) for d in value):
        value = [d["text"] for d in value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'documents' must be a non-empty list of strings", param="documents")
    return _texts(value, "documents", opts)


def build_app(models: Sequence[tuple[str, object]], options: ServeOptions = ServeOptions(), *, access: Access = Access(),
              predictor_options: dict | None = None):
    """The ASGI application serving ``models``, a list of ``(name, Artifact)`` (opened
    ``bertexport.shipping.runtime.Artifact``s, activated by the caller); each gets a
    ``Predictor(art, **predictor_options)`` behind its own batcher, whose threads run while
    the app's lifespan does. ``app.state.service`` (on the inner Starlette app) holds them."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from bertexport.core.tasks import TASKS
    from bertexport.shipping.runtime import Predictor

    options.check()
    access.check()
    check_names([name for name, _ in models])
    popts = {"batch_size": SERVE_BATCH_SIZE} | (predictor_options or {})
    svc = Service([(name, Predictor(art, **popts)) for name, art in models], options)

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def embeddings(request):
        data = await _read_json(request, options.max_body_bytes)
        model = svc.pick(data)
        if model.task != "feature-extraction":
            raise svc.wrong_endpoint(model)
        fmt = data.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        dims = data.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool)):
            raise ApiError(400, "'dimensions' must be an integer", param="dimensions")
        texts = _texts(data.get("input"), "input", options)
        _check_chars(options, texts)
        results, tokens = await model.infer(texts)
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
        return JSONResponse({"object": "list", "data": rows, "model": model.name,
                             "usage": {"prompt_tokens": used, "total_tokens": used}})

    def task_endpoint(task: str):
        async def predict(request):
            data = await _read_json(request, options.max_body_bytes)
            model = svc.pick(data)
            if task != model.task:
                raise svc.wrong_endpoint(model)
            texts = _texts(data.get("inputs"), "inputs", options)
            pairs = None
            if model.predictor.task.needs_pair:
                ctx = data.get("context")
                if isinstance(ctx, list):
                    pairs = _texts(ctx, "context", options)
                    if len(pairs) != len(texts):
                        raise ApiError(400, f"'context' has {len(pairs)} texts for {len(texts)} questions", param="context")
                else:
                    pairs = _texts(ctx, "context", options, allow_list=False) * len(texts)
                _check_chars(options, texts, pairs[:1] if not isinstance(ctx, list) else pairs)
            elif data.get("context") is not None:
                raise ApiError(400, f"'context' is for question-answering; this model does {model.task}", param="context")
            else:
                _check_chars(options, texts)
            results, tokens = await model.infer(texts, pairs)
            rows = [{"index": i, "text_prefix": t[:40], **r} for i, (t, r) in enumerate(zip(texts, results))]
            used = int(sum(tokens))
            return JSONResponse({"model": model.name, "task": model.task, "results": rows,
                                 "usage": {"prompt_tokens": used, "total_tokens": used}})
        return predict

    async def rerank(request):
        data = await _read_json(request, options.max_body_bytes)
        model = svc.pick(data)
        if not model.rerank_logits:
            raise ApiError(400, f"model '{model.name}' cannot rerank: {model.rerank_refusal}", param="model",
                           code="not_a_reranker")
        query = _texts(data.get("query"), "query", options, allow_list=False)[0]
        docs = _documents(data.get("documents"), options)
        top_n = data.get("top_n")
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
            raise ApiError(400, "'top_n' must be a positive integer", param="top_n")
        with_docs = data.get("return_documents", False)
        if not isinstance(with_docs, bool):
            raise ApiError(400, "'return_documents' must be true or false", param="return_documents")
        _check_chars(options, [query], docs)
        # the query is kept whole in every window of a document: it must leave the document room
        room = model.predictor.max_length - model.predictor.stride - 8
        (q_tokens,) = model.count_tokens([query])
        if q_tokens > room:
            raise ApiError(400, f"the query has {q_tokens} tokens; at most {room} for this model (the rest of each "
                                f"{model.predictor.max_length}-token window holds the document)", param="query")
        results, tokens = await model.infer([query] * len(docs), docs, mode="rerank")
        order = sorted(range(len(docs)), key=lambda i: -results[i]["relevance_score"])  # stable: ties by index
        rows = []
        for i in order[:top_n]:
            row = {"index": i, "relevance_score": results[i]["relevance_score"]}
            if with_docs:
                row["document"] = {"text": docs[i]}
            rows.append(row)
        used = int(sum(tokens))
        return JSONResponse({"object": "rerank", "model": model.name, "results": rows,
                             "usage": {"prompt_tokens": used, "total_tokens": used}})

    async def list_models(request):
        return JSONResponse({"object": "list", "data": [m.describe() for m in svc.models.values()]})

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def ready(request):
        down = [name for name, m in svc.models.items() if not m.batcher.alive]
        if down:
            return JSONResponse({"status": "not ready", "models": down}, status_code=503)
        body = {"status": "ready", "models": list(svc.models)}
        if len(svc.models) == 1:
            (m,) = svc.models.values()
            body |= {"model": m.name, "task": m.task}
        return JSONResponse(body)

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
        for m in svc.models.values():
            m.batcher.start()
        try:
            yield
        finally:
            for m in svc.models.values():  # each answers whatever is still queued
                await asyncio.to_thread(m.batcher.stop)

    routes = [Route(EMBEDDINGS, embeddings, methods=["POST"]), Route(RERANK, rerank, methods=["POST"])]
    routes += [Route(f"/v1/{t}", task_endpoint(t), methods=["POST"]) for t in TASKS]
    routes += [Route("/v1/models", list_models, methods=["GET"]), Route("/health", health, methods=["GET"]),
               Route("/ready", ready, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.service = svc
    guarded = _Keyed(app, access) if access.api_key else app
    return _Measured(guarded, svc.metrics, {r.path for r in routes})


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


def model_names(artifacts: Sequence[str | Path], names: Sequence[str] | None = None) -> list[str]:
    """Each artifact's model name: ``names`` in order, then the folder's name; refused
    (UserError) when there are more names than artifacts or two are the same."""
    names = list(names or [])
    if len(names) > len(artifacts):
        raise UserError(f"{len(names)} --model-name for {len(artifacts)} artifact(s): give at most one per artifact, in order")
    out = names + [Path(a).resolve().name for a in artifacts[len(names):]]
    check_names(out)
    return out


def threads_per_model(models: int, threads: int | None) -> int | None:
    """Runtime (intra-op) threads of each model: ``threads`` when given; one model: the
    runtime's default; several: this machine's cores split between them (at least one
    each), so each model's inference thread has cores of its own and a flood on one model
    does not slow the others' answers (measured in docs/serving.md)."""
    if threads or models == 1:
        return threads
    return max(1, cpu_count() // models)


def serve(artifacts: str | Path | Sequence[str | Path], *, host: str = "127.0.0.1", port: int = 8000, trusted_key=None,
          threads: int | None = None, model_name: str | Sequence[str] | None = None,
          options: ServeOptions = ServeOptions(), access: Access = Access(), predictor_options: dict | None = None,
          grace_seconds: float = 30.0, on_listening: Callable[[str, list], None] | None = None) -> None:
    """Verify and load ``artifacts`` (one path or several), then serve them on host:port
    until SIGINT/SIGTERM, routed by the request's ``model`` (``model_name``: one name per
    artifact in order, the rest named by their folder).

    Everything that can be refused is refused before the port opens (``UserError``). On a
    signal uvicorn stops accepting, waits up to ``grace_seconds`` for in-flight requests,
    and re-raises the signal once it is done (the CLI maps it to 130/143).
    ``on_listening(url, [(name, Artifact), ...])`` is called once the port is open."""
    from bertexport.shipping.runtime import Artifact

    paths = [artifacts] if isinstance(artifacts, (str, Path)) else list(artifacts)
    if not paths:
        raise UserError("nothing to serve: give at least one artifact")
    names = model_names(paths, [model_name] if isinstance(model_name, str) else model_name)
    from bertexport.core.manifest import load_manifest

    for path in paths:  # every folder is an artifact before any model loads
        if not Path(path).is_dir():
            raise UserError(f"artifact not found: {path}")
        load_manifest(Path(path))
    options.check()
    access.check()
    _require_stack()
    import uvicorn

    per_model = threads_per_model(len(paths), threads)
    with contextlib.ExitStack() as stack:
        loaded = []
        for name, path in zip(names, paths):
            art = Artifact(path, threads=per_model, trusted_key=trusted_key)  # checksums, digest, signature
            loaded.append((name, stack.enter_context(art)))
        app = build_app(loaded, options, access=access, predictor_options=predictor_options)
        sock = listen(host, port)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=grace_seconds, server_header=False)
        server = uvicorn.Server(config)
        if on_listening is not None:
            on_listening(url_of(sock), loaded)
        server.run(sockets=[sock])
