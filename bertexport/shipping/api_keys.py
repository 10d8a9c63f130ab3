"""``serve --api-key``: who may call the server. With a key every request but the probes
(``/health``, ``/ready``; ``/metrics`` when told) must send ``Authorization: Bearer KEY``,
compared in constant time; the key comes from ``--api-key``, ``BERTEXPORT_API_KEY`` or a file."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from bertexport.core.errors import UserError
from bertexport.shipping.serve_requests import ApiError
from bertexport.shipping.settings import API_KEY_ENV

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


class KeyGuard:
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
