"""Several artifacts in one ``serve`` process: each model (``ServedModel``) behind its own
batcher — its own bounded queue and inference thread — and the routing of a request to the
model its ``model`` names (``Service``). Also the models' names (``--model-name`` or the
folder's) and their share of the cores."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path
from typing import Callable, Sequence

from bertexport.core.envinfo import cpu_count
from bertexport.core.errors import BertExportError, UserError
from bertexport.shipping.batching import Batcher, QueueFull
from bertexport.shipping.rerank import relevance_head, reranker
from bertexport.shipping.serve_metrics import Metrics
from bertexport.shipping.serve_requests import ApiError, ServeOptions

log = logging.getLogger("bertexport.shipping.serve")

EMBEDDINGS = "/v1/embeddings"
RERANK = "/v1/rerank"
RERANK_TEI = "/rerank"  # Text Embeddings Inference's path and shape


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
                + ([RERANK, RERANK_TEI] if self.rerank_logits else [])}


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

    def only_reranker(self) -> ServedModel:
        """The model a rerank request without ``model`` means: the one reranker served."""
        able = [m for m in self.models.values() if m.rerank_logits]
        if len(able) != 1:
            which = (f"the rerankers are {', '.join(repr(m.name) for m in able)}" if able
                     else f"none of {self.served()} can rerank")
            raise ApiError(400, f"'model' is missing: {which}", param="model", code="model_required")
        return able[0]

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

