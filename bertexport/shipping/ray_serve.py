"""``serve --ray [ADDRESS]``: the ``serve`` application as a Ray Serve deployment.

Each replica is a Ray actor that opens the artifacts and builds the very same ASGI app as
the single process (``bertexport.shipping.serve_app.build_app``: same endpoints, same batcher
per model, same answers); Ray Serve's proxy routes HTTP to the replicas and restarts a
replica that dies. Ray Serve's API as documented for Ray 2.60: ``@serve.deployment``
(``num_replicas`` or ``autoscaling_config``, ``ray_actor_options``, ``max_ongoing_requests``),
``@serve.ingress()`` with ``__serve_build_asgi_app__`` (the app is built on the replica,
after its constructor opened the artifacts), ``serve.start(http_options=...)``,
``serve.run(..., name=..., route_prefix="/")``, ``serve.delete``/``serve.shutdown``.

Everything that can be refused is refused in the driver before any replica starts:
names, options, each artifact's manifest, checksums, signature and status. Without an
ADDRESS a local Ray instance is started on loopback and shut down at the end; with one,
the application is deployed on that cluster (whose nodes must read the artifact paths and
have bertexport installed) and deleted from it when the command stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from bertexport.core.errors import UserError

APP_NAME = "bertexport"
DEPLOYMENT_NAME = "BertexportServer"
LOCAL = "local"


@dataclass(frozen=True)
class RayServeOptions:
    """Replicas and their resources. With ``min_replicas``/``max_replicas`` Ray Serve
    autoscales between them (``replicas`` replicas to start with); else ``replicas`` fixed."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    grace_seconds: float = 30.0  # a replica being stopped finishes its requests for this long

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def bounds(self) -> tuple[int, int, int]:
        """(min, initial, max) replicas under autoscaling."""
        lo = self.min_replicas if self.min_replicas is not None else 1
        hi = self.max_replicas if self.max_replicas is not None else max(lo, self.replicas)
        return lo, min(max(self.replicas, lo), hi), hi

    def check(self) -> None:
        if self.replicas < 1:
            raise UserError("--replicas must be at least 1")
        if self.grace_seconds < 0:
            raise UserError("--grace must be >= 0")
        if self.cpus_per_replica <= 0:
            raise UserError("CPUs per replica must be positive")
        if self.min_replicas is not None and self.min_replicas < 0:
            raise UserError("--min-replicas must be >= 0")
        if self.max_replicas is not None and self.max_replicas < 1:
            raise UserError("--max-replicas must be at least 1")
        if self.autoscaling:
            lo, _, hi = self.bounds()
            if lo > hi:
                raise UserError(f"--min-replicas {lo} is over --max-replicas {hi}")

    def deployment_options(self, max_ongoing_requests: int) -> dict:
        """Keyword arguments of ``serve.deployment``/``.options``."""
        opts = {"name": DEPLOYMENT_NAME, "ray_actor_options": {"num_cpus": self.cpus_per_replica},
                # the replica's own batcher queues and answers 503 when full: let Serve hand it that many
                "max_ongoing_requests": max_ongoing_requests, "graceful_shutdown_timeout_s": self.grace_seconds,
                # a replica that cannot start fails the deployment after 3 tries (Serve's default retries 20 times)
                "max_constructor_retry_count": 3}
        if self.autoscaling:
            lo, initial, hi = self.bounds()
            opts["autoscaling_config"] = {"min_replicas": lo, "initial_replicas": initial, "max_replicas": hi}
        else:
            opts["num_replicas"] = self.replicas
        return opts


class ReplicaApp:
    """What one replica runs: the artifacts opened (verified again where the replica runs)
    and ``build_app`` over them. Wrapped by ``serve.ingress()`` in ``_deployment``."""

    def __init__(self, paths: list[str], names: list[str], trusted_key, threads, options, access, predictor_options):
        from bertexport.shipping.runtime import Artifact
        from bertexport.shipping.serve_app import build_app

        self._stack = contextlib.ExitStack()
        loaded = [(name, self._stack.enter_context(Artifact(path, threads=threads, trusted_key=trusted_key)))
                  for name, path in zip(names, paths)]
        self._app = build_app(loaded, options, access=access, predictor_options=predictor_options)

    def __serve_build_asgi_app__(self):
        return self._app


def _deployment(ray_options: RayServeOptions, max_ongoing_requests: int):
    from ray import serve

    ingress = serve.ingress()(ReplicaApp)
    return serve.deployment(**ray_options.deployment_options(max_ongoing_requests))(ingress)


def check_artifacts(paths: Sequence[str | Path], trusted_key=None, predictor_options: dict | None = None) -> None:
    """Manifest, checksums, signature and status of every artifact, and the window options
    against each one's max length, in the driver, before any replica starts (the replicas
    check again where they run)."""
    from bertexport.core.manifest import load_manifest, verify_files

    popts = predictor_options or {}

    for path in paths:
        folder = Path(path)
        if not folder.is_dir():
            raise UserError(f"artifact not found: {folder}")
        manifest = load_manifest(folder)
        problems = verify_files(folder, manifest)
        if problems:
            raise UserError(f"artifact {folder} failed its checksums: {'; '.join(problems[:3])}")
        if trusted_key:
            from bertexport.shipping.signing import verify_signature

            verify_signature(folder, trusted_key)
        if manifest.get("status") != "passed":
            raise UserError(f"artifact {folder} was rejected at build time ({'; '.join(manifest['parity']['failures'])})")
        limit = int(manifest["max_length"])
        length = min(popts.get("max_length") or limit, limit)
        stride = length // 4 if popts.get("stride") is None else popts["stride"]
        if not 0 <= stride < length - 4:  # as runtime.Predictor says it
            raise UserError(f"stride must be in [0, {length - 4}) for max length {length}")


def _replica_error(e: BaseException) -> UserError:
    """A replica that could not start, said in one line: its UserError when it raised one,
    else the last error line of the deployment's status message (where Serve keeps the
    replica's traceback), else what ``serve.run`` said."""
    import re

    from bertexport.shipping.bulk import _user_error_in

    user = _user_error_in(e)
    if user is not None:
        return UserError(f"a Ray Serve replica could not start: {user}")
    text = str(e)
    try:
        from ray import serve

        app = serve.status().applications.get(APP_NAME)
        deployment = app.deployments.get(DEPLOYMENT_NAME) if app else None
        text = (deployment.message if deployment and deployment.message else "") + "\n" + text
    except Exception:  # the status is a best effort: serve.run's own error stays
        pass
    errors = [l.strip() for l in text.splitlines() if re.match(r"\s*[\w.]*(Error|Exception): ", l)]
    for line in errors:
        if "UserError:" in line:
            return UserError(f"a Ray Serve replica could not start: {line.split('UserError:', 1)[1].strip()[:300]}")
    last = errors[-1] if errors else next((l.strip() for l in reversed(text.splitlines()) if l.strip()), type(e).__name__)
    return UserError(f"a Ray Serve replica could not start: {last[:300]}")


@dataclass
class RayServer:
    """A running Ray Serve application (``start``); ``stop`` deletes it and shuts down what
    this process started."""

    url: str
    names: list[str]
    started_ray: bool
    started_serve: bool

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if self.started_serve:
                serve.shutdown()
            else:  # a Serve instance that was there before: remove only our application
                serve.delete(APP_NAME)
        finally:
            if self.started_ray:
                ray.shutdown()


def start(artifacts: str | Path | Sequence[str | Path], *, address: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, ray_options: RayServeOptions = RayServeOptions(), trusted_key=None, threads: int | None = None,
          model_name: str | Sequence[str] | None = None, options=None, access=None,
          predictor_options: dict | None = None) -> RayServer:
    """Deploy the artifacts on Ray Serve and return once every replica is up (or a
    UserError). ``address``: None or ``"local"`` for a local instance on loopback (or the
    one this process already runs), else a cluster's address."""
    from bertexport.shipping.api_keys import Access
    from bertexport.shipping.model_routing import model_names
    from bertexport.shipping.serve import require_stack
    from bertexport.shipping.serve_requests import ServeOptions

    options = options or ServeOptions()
    access = access or Access()
    paths = [artifacts] if isinstance(artifacts, (str, Path)) else list(artifacts)
    if not paths:
        raise UserError("nothing to serve: give at least one artifact")
    names = model_names(paths, [model_name] if isinstance(model_name, str) else model_name)
    options.check()
    access.check()
    ray_options.check()
    if not 1 <= port <= 65535:
        raise UserError("--ray needs a fixed --port (Ray Serve's proxy does not pick a free one)")
    require_stack()
    check_artifacts(paths, trusted_key, predictor_options)
    local = not address or address == LOCAL
    if local:  # a local instance serves this machine only: keep it on loopback (read at ray's import)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise UserError("--ray needs Ray Serve: pip install 'bertexport[ray]'") from e
    from bertexport.shipping.bulk import _ray_env, check_ray_address

    if not local:
        check_ray_address(address)
    started_ray = not ray.is_initialized()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if started_ray:
        for k, v in _ray_env().items():
            os.environ.setdefault(k, v)
        ray.init(address=None if local else address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, logging_level="ERROR")
    paths = [str(Path(p).resolve()) for p in paths]
    started_serve = False
    server = None
    try:
        client = serve.context._connect(raise_if_no_controller_running=False)  # Serve already on this cluster?
        if client is None:  # no: this process starts it (and ends it)
            serve.start(http_options={"host": host, "port": port},
                        logging_config={"log_level": "WARNING", "enable_access_log": False})
            started_serve = True
        else:  # yes: its proxies' address is where the application answers
            host, port = client.http_config.host, client.http_config.port
        server = RayServer(f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}", names,
                           started_ray, started_serve)
        app = _deployment(ray_options, options.queue_size).bind(paths, names, trusted_key, threads, options, access,
                                                                 predictor_options)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except Exception as e:
            raise _replica_error(e) from None
        return server
    except BaseException:
        if server is not None:
            server.stop()
        elif started_ray:
            ray.shutdown()
        raise
    finally:
        for s, h in handlers.items():  # ray.init may take over the signals: the caller's handlers again
            if h is not None:
                signal.signal(s, h)


def serve_ray(artifacts, *, on_listening: Callable[[RayServer], None] | None = None, **kwargs) -> None:
    """``start``, then wait until SIGINT/SIGTERM (the CLI's handlers raise them as
    KeyboardInterrupt/Interrupted), then stop: the application is deleted, and Serve and Ray
    shut down when this process started them."""
    server = start(artifacts, **kwargs)
    try:
        if on_listening is not None:
            on_listening(server)
        forever = threading.Event()
        while not forever.wait(3600):
            pass
    finally:
        server.stop()
