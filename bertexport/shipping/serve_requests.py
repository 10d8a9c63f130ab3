"""What a ``serve`` request may be: the server's limits (``ServeOptions``), the error every
refusal is said as (``ApiError``, OpenAI's ``{"error": {...}}`` body), and the readers of a
request body (JSON within the byte limit, texts within the text and character limits,
rerank documents). A request refused here never reaches a model."""

from __future__ import annotations

import json
from dataclasses import dataclass

from bertexport.core.errors import UserError


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


class ApiError(Exception):
    """An answer other than 200, said as OpenAI's error body."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


async def read_json(request, limit: int) -> dict:
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
    import orjson  # the serve extra's: 3-10x json's speed on the event loop every model shares

    try:
        data = orjson.loads(bytes(body))
    except ValueError:  # orjson refuses lone surrogates (\ud800) too: json reads them, so the texts' check can say so
        try:
            data = json.loads(bytes(body))
        except (ValueError, RecursionError):  # bad JSON, bad UTF-8, absurd nesting
            raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def read_texts(value, param: str, opts: ServeOptions, *, allow_list: bool = True) -> list[str]:
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


def check_chars(opts: ServeOptions, *groups: list[str]) -> None:
    total = sum(len(t) for g in groups for t in g)
    if total > opts.max_chars:
        raise ApiError(400, f"the request holds {total} characters; at most {opts.max_chars}", code="too_many_characters")


def read_documents(value, opts: ServeOptions) -> list[str]:
    """Rerank documents: a non-empty list of strings (or of ``{"text": str}``, Cohere's older form)."""
    if isinstance(value, list) and value and all(isinstance(d, dict) and isinstance(d.get("text"), str) for d in value):
        value = [d["text"] for d in value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'documents' must be a non-empty list of strings", param="documents")
    return read_texts(value, "documents", opts)

