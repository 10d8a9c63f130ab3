"""``bertexport serve``'s library entry, taking its settings record (``shipping.settings.ServeSettings``):
the artifacts served by one process (``shipping.serve``) or, with ``--ray``, as a Ray Serve
deployment (``shipping.ray_serve``), with the request limits, API key and predictor options
the record holds."""

from __future__ import annotations

from typing import Callable

from bertexport.shipping.settings import ServeSettings


def serve_command(settings: ServeSettings, *, on_listening: Callable[[str, str], None] | None = None,
                  on_warning: Callable[[str], None] | None = None) -> None:
    """Serve ``settings.artifacts`` until SIGINT/SIGTERM (raised as ``KeyboardInterrupt``/
    ``Interrupted`` once the server has stopped). Names, limits and the API key are checked
    before anything loads (``UserError``). ``on_listening(url, what)`` is called once the
    port is open, ``what`` saying what is served where; ``on_warning`` gets the warnings
    (an artifact's versions, a setting that changes nothing). ``--exit-threshold`` applies to
    every artifact served: each must be an early-exit one (refused before anything loads)."""
    from bertexport.shipping.api_keys import Access, read_api_key
    from bertexport.shipping.model_routing import model_names
    from bertexport.shipping.runtime import check_exit_threshold_applies
    from bertexport.shipping.serve_requests import ServeOptions

    s = settings
    warn = on_warning or (lambda message: None)
    options = ServeOptions(**s.request_limits())
    model_names(s.artifacts, s.model_names)  # duplicates and extra names: refused before anything loads
    check_exit_threshold_applies(s.artifacts, s.exit_threshold)  # their manifests only
    access = Access(api_key=read_api_key(s.api_key, s.api_key_file), metrics_open=s.metrics_open)
    if s.metrics_open and not access.api_key:
        warn("--metrics-open without an API key changes nothing (every endpoint is open)")
    from bertexport.core.interrupts import CLEANUP_SECONDS, allow_cleanup

    allow_cleanup(s.grace + CLEANUP_SECONDS)  # a signal's unwinding stops Ray Serve's replicas within the grace period
    if s.ray_address is not None:
        _serve_on_ray(s, options, access, on_listening)
        return
    from bertexport.shipping.serve import serve

    def listening(url, loaded):
        for _, art in loaded:
            for w in art.warnings:
                warn(w)
        if on_listening is None:
            return
        served = ", ".join(f"{name} ({art.task}, {art.name})" for name, art in loaded)
        from bertexport.shipping.model_routing import RERANK, RERANK_TEI
        from bertexport.shipping.rerank import relevance_head

        endpoints = {"POST /v1/embeddings" if art.task == "feature-extraction" else f"POST /v1/{art.task}"
                     for _, art in loaded}
        if any(relevance_head(art.manifest, art.id2label)[0] for _, art in loaded):  # a cross-encoder also reranks
            endpoints |= {f"POST {RERANK}", f"POST {RERANK_TEI}"}
        endpoints = sorted(endpoints)
        keyed = "; API key required" if access.api_key else ""
        on_listening(url, f"{served} on {url} — {', '.join(endpoints)}; GET /v1/models /health /ready /metrics{keyed}")

    serve(list(s.artifacts), host=s.host, port=s.port, trusted_key=s.trusted_key, threads=s.threads,
          model_name=list(s.model_names), options=options, access=access, grace_seconds=s.grace, on_listening=listening,
          predictor_options=s.predictor_options())


def _serve_on_ray(s: ServeSettings, options, access, on_listening) -> None:
    import logging

    from bertexport.shipping.ray_serve import RayServeOptions, serve_ray

    ray_options = RayServeOptions(replicas=s.replicas or 1, min_replicas=s.min_replicas, max_replicas=s.max_replicas,
                                  cpus_per_replica=float(s.threads or 1), grace_seconds=s.grace)

    def listening(server):
        if on_listening is None:
            return
        lo, _, hi = ray_options.bounds()
        scale = (f"{lo}-{hi} replicas (autoscaling)" if ray_options.autoscaling
                 else f"{ray_options.replicas} replica{'s' if ray_options.replicas > 1 else ''}")
        on_listening(server.url, f"{', '.join(server.names)} on {server.url} — Ray Serve, {scale}")

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve_ray(list(s.artifacts), address=s.ray_address, host=s.host, port=s.port, ray_options=ray_options,
              trusted_key=s.trusted_key, threads=s.threads or 1, model_name=list(s.model_names), options=options,
              access=access, on_listening=listening, predictor_options=s.predictor_options())
