"""The ``serve`` application: ``build_app(models, options, access=..., predictor_options=...)``
builds the ASGI app from a list of ``(name, Artifact)``; ``serve`` runs it under uvicorn, and
any other ASGI host (Ray Serve, ``bertexport.shipping.ray_serve``) can run the same app.
Endpoints follow each model's task record:

- ``POST /v1/embeddings`` (feature-extraction): OpenAI's request and response shape, so
  the official ``openai`` client works with ``base_url``;
- ``POST /v1/<task>`` (every task): ``{"inputs": str | [str], "context": ...}`` ->
  ``{"results": [...]}``, each result exactly one line of ``bertexport run --json``;
- ``POST /v1/rerank`` (a text-classification model with a 1- or 2-logit relevance head, a
  cross-encoder): the request/response shape of Cohere's, Jina's and infinity's rerank APIs;
  ``POST /rerank``: the same scores in Text Embeddings Inference's own shape;
- ``GET /v1/models``, ``/health`` (the process answers), ``/ready`` (models loaded,
  inference threads running), ``/metrics`` (Prometheus text format).

Requests go through each model's own ``batching.Batcher`` (``model_routing``) into
``Predictor.predict``: the same windowing, batching by length and post-processing as
``run``. Bad requests get a 4xx JSON error (OpenAI's ``{"error": {...}}`` shape) and never
reach a model; a full queue gets 503 with ``Retry-After``. With an API key every endpoint
but ``/health`` and ``/ready`` (and ``/metrics`` when told) needs ``Authorization: Bearer
KEY`` (``api_keys``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from typing import Sequence

import numpy as np

from bertexport.shipping.api_keys import Access, KeyGuard
from bertexport.shipping.model_routing import EMBEDDINGS, RERANK, RERANK_TEI, Service, check_names
from bertexport.shipping.serve_metrics import MeasuredApp
from bertexport.shipping.settings import SERVE_BATCH_SIZE
from bertexport.shipping.serve_requests import ApiError, ServeOptions, check_chars, read_documents, read_json, read_texts

log = logging.getLogger("bertexport.shipping.serve")



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


def json_response_class():
    """Starlette's ``JSONResponse`` rendered by orjson: the event loop every served model
    shares spends less of its time (and of the GIL) on each answer. Same JSON: floats in
    their shortest round-trip form, as ``json`` writes them."""
    import orjson
    from starlette.responses import JSONResponse

    options = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

    class OrjsonResponse(JSONResponse):
        def render(self, content) -> bytes:
            return orjson.dumps(content, option=options)

    return OrjsonResponse


def build_app(models: Sequence[tuple[str, object]], options: ServeOptions = ServeOptions(), *, access: Access = Access(),
              predictor_options: dict | None = None):
    """The ASGI application serving ``models``, a list of ``(name, Artifact)`` (opened
    ``bertexport.shipping.runtime.Artifact``s, activated by the caller); each gets a
    ``Predictor(art, **predictor_options)`` behind its own batcher, whose threads run while
    the app's lifespan does. ``app.state.service`` (on the inner Starlette app) holds them."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import Response
    from starlette.routing import Route

    from bertexport.core.tasks import TASKS
    from bertexport.shipping.runtime import Predictor

    JSONResponse = json_response_class()
    options.check()
    access.check()
    check_names([name for name, _ in models])
    popts = {"batch_size": SERVE_BATCH_SIZE} | (predictor_options or {})
    svc = Service([(name, Predictor(art, **popts)) for name, art in models], options)

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def embeddings(request):
        data = await read_json(request, options.max_body_bytes)
        model = svc.pick(data)
        if model.task != "feature-extraction":
            raise svc.wrong_endpoint(model)
        fmt = data.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
        dims = data.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool)):
            raise ApiError(400, "'dimensions' must be an integer", param="dimensions")
        texts = read_texts(data.get("input"), "input", options)
        check_chars(options, texts)
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
            data = await read_json(request, options.max_body_bytes)
            model = svc.pick(data)
            if task != model.task:
                raise svc.wrong_endpoint(model)
            texts = read_texts(data.get("inputs"), "inputs", options)
            pairs = None
            if model.predictor.task.needs_pair:
                ctx = data.get("context")
                if isinstance(ctx, list):
                    pairs = read_texts(ctx, "context", options)
                    if len(pairs) != len(texts):
                        raise ApiError(400, f"'context' has {len(pairs)} texts for {len(texts)} questions", param="context")
                else:
                    pairs = read_texts(ctx, "context", options, allow_list=False) * len(texts)
                check_chars(options, texts, pairs[:1] if not isinstance(ctx, list) else pairs)
            elif data.get("context") is not None:
                raise ApiError(400, f"'context' is for question-answering; this model does {model.task}", param="context")
            else:
                check_chars(options, texts)
            results, tokens = await model.infer(texts, pairs)
            rows = [{"index": i, "text_prefix": t[:40], **r} for i, (t, r) in enumerate(zip(texts, results))]
            used = int(sum(tokens))
            return JSONResponse({"model": model.name, "task": model.task, "results": rows,
                                 "usage": {"prompt_tokens": used, "total_tokens": used}})
        return predict

    async def ranked(model, query: str, docs: list[str]) -> tuple[list[int], list[dict], int]:
        """The documents' scores for the query, and their order (best first; ties: lower index first)."""
        check_chars(options, [query], docs)
        # the query is kept whole in every window of a document: it must leave the document room
        room = model.predictor.max_length - model.predictor.stride - 8
        (q_tokens,) = model.count_tokens([query])
        if q_tokens > room:
            raise ApiError(400, f"the query has {q_tokens} tokens; at most {room} for this model (the rest of each "
                                f"{model.predictor.max_length}-token window holds the document)", param="query")
        results, tokens = await model.infer([query] * len(docs), docs, mode="rerank")
        order = sorted(range(len(docs)), key=lambda i: -results[i]["relevance_score"])  # stable: ties by index
        return order, results, int(sum(tokens))

    def reranking_model(data: dict):
        model = svc.pick(data) if data.get("model") is not None or len(svc.models) == 1 else svc.only_reranker()
        if not model.rerank_logits:
            raise ApiError(400, f"model '{model.name}' cannot rerank: {model.rerank_refusal}", param="model",
                           code="not_a_reranker")
        return model

    def flag(data: dict, key: str) -> bool:
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise ApiError(400, f"'{key}' must be true or false", param=key)
        return value

    async def rerank(request):
        """Cohere's, Jina's and infinity's shape."""
        data = await read_json(request, options.max_body_bytes)
        model = reranking_model(data)
        query = read_texts(data.get("query"), "query", options, allow_list=False)[0]
        docs = read_documents(data.get("documents"), options)
        top_n = data.get("top_n")
        if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
            raise ApiError(400, "'top_n' must be a positive integer", param="top_n")
        with_docs = flag(data, "return_documents")
        order, results, used = await ranked(model, query, docs)
        rows = []
        for i in order[:top_n]:
            row = {"index": i, "relevance_score": results[i]["relevance_score"]}
            if with_docs:
                row["document"] = {"text": docs[i]}
            rows.append(row)
        return JSONResponse({"object": "rerank", "model": model.name, "results": rows,
                             "usage": {"prompt_tokens": used, "total_tokens": used}})

    async def rerank_tei(request):
        """Text Embeddings Inference's own shape: ``texts``, ``raw_scores``, ``return_text`` ->
        a list of ``{index, score[, text]}``, best first."""
        data = await read_json(request, options.max_body_bytes)
        model = reranking_model(data)
        query = read_texts(data.get("query"), "query", options, allow_list=False)[0]
        docs = read_texts(data.get("texts"), "texts", options)
        raw, with_text = flag(data, "raw_scores"), flag(data, "return_text")
        order, results, _ = await ranked(model, query, docs)
        rows = []
        for i in order:
            row = {"index": i, "score": results[i]["logit" if raw else "relevance_score"]}
            if with_text:
                row["text"] = docs[i]
            rows.append(row)
        return JSONResponse(rows)

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

    routes = [Route(EMBEDDINGS, embeddings, methods=["POST"]), Route(RERANK, rerank, methods=["POST"]),
              Route(RERANK_TEI, rerank_tei, methods=["POST"])]
    routes += [Route(f"/v1/{t}", task_endpoint(t), methods=["POST"]) for t in TASKS]
    routes += [Route("/v1/models", list_models, methods=["GET"]), Route("/health", health, methods=["GET"]),
               Route("/ready", ready, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.service = svc
    guarded = KeyGuard(app, access) if access.api_key else app
    return MeasuredApp(guarded, svc.metrics, {r.path for r in routes})
