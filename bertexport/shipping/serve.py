"""``bertexport serve``: artifacts behind HTTP, torch-free (Starlette + uvicorn).

Every artifact is verified (checksums, manifest digest, and its signature when a trusted
key is given) and loaded before the port opens; then ``serve_app.build_app``'s application
runs under uvicorn on a socket of its own. What it serves is described there and in
docs/serving.md; the modules it is made of:

- ``serve_requests``: limits (``ServeOptions``), ``ApiError``, reading request bodies;
- ``api_keys``: ``--api-key`` (``Access``), the bearer-key guard;
- ``serve_metrics``: ``/metrics`` and the middleware that measures every request;
- ``rerank``: cross-encoders for ``/v1/rerank``;
- ``model_routing``: each model behind its own batcher, routed by the request's ``model``;
- ``serve_app``: the endpoints (``build_app``).

On SIGTERM uvicorn stops accepting, lets in-flight requests finish, and the command exits 143.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Callable, Sequence

from bertexport.core.errors import UserError
from bertexport.shipping.api_keys import Access
from bertexport.shipping.model_routing import model_names, threads_per_model
from bertexport.shipping.serve_app import build_app
from bertexport.shipping.serve_requests import ServeOptions


def require_stack():
    missing = []
    for name in ("starlette", "uvicorn", "prometheus_client", "orjson"):
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
    require_stack()
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
