"""The serve command: artifacts behind HTTP (OpenAI embeddings, task endpoints, rerank, keys, metrics)."""

from __future__ import annotations

from pathlib import Path

import click

from bertexport.cli.group import EXIT_CODES_HELP, _threads_option, _trusted_key_option, cli

SERVE_BATCH_SIZE = 8  # == bertexport.shipping.serve_app.SERVE_BATCH_SIZE (the CLI stays import-light)


# -- serve --ray: the same app as a Ray Serve deployment (bertexport/shipping/ray_serve.py) --------------
def _ray_serve_options(command):
    """Adds --ray/--replicas/--min-replicas/--max-replicas; with --ray the parsed options go to
    ``ray_serve.serve_ray`` instead of the single-process server."""
    import functools

    @functools.wraps(command)
    def with_ray(*args, ray_address, replicas, min_replicas, max_replicas, **kw):
        from bertexport.core.errors import Interrupted, UserError

        if ray_address is None:
            if replicas is not None or min_replicas is not None or max_replicas is not None:
                raise UserError("--replicas, --min-replicas and --max-replicas are for --ray")
            return command(*args, **kw)
        from bertexport.shipping.ray_serve import RayServeOptions, serve_ray
        from bertexport.shipping.api_keys import Access, read_api_key
        from bertexport.shipping.serve_requests import ServeOptions

        options = ServeOptions(**{k: kw[k] for k in ("max_batch_tokens", "max_wait_ms", "queue_size", "max_texts",
                                                     "max_chars", "max_body_bytes")})
        access = Access(api_key=read_api_key(kw["api_key"], kw["api_key_file"]), metrics_open=kw["metrics_open"])
        ray_options = RayServeOptions(replicas=replicas or 1, min_replicas=min_replicas, max_replicas=max_replicas,
                                      cpus_per_replica=float(kw["threads"] or 1), grace_seconds=kw["grace"])

        def listening(server):
            scale = (f"{ray_options.bounds()[0]}-{ray_options.bounds()[2]} replicas (autoscaling)" if ray_options.autoscaling
                     else f"{ray_options.replicas} replica{'s' if ray_options.replicas > 1 else ''}")
            click.echo(f"serving {', '.join(server.names)} on {server.url} — Ray Serve, {scale}", err=True)

        import logging

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        try:
            serve_ray(list(kw["artifacts"]), address=ray_address, host=kw["host"], port=kw["port"], ray_options=ray_options,
                      trusted_key=kw["trusted_key"], threads=kw["threads"] or 1, model_name=list(kw["model_names"]),
                      options=options, access=access, on_listening=listening,
                      predictor_options=dict(batch_size=kw["batch_size"], top_k=kw["top_k"], stride=kw["stride"],
                                             max_length=kw["max_length"], aggregation=kw["aggregation"],
                                             normalize=kw["normalize"]))
        except (Interrupted, KeyboardInterrupt) as e:
            code = e.exit_code if isinstance(e, Interrupted) else 130
            click.echo(f"stopped ({'SIGTERM' if code == 143 else 'interrupted'}): the Ray Serve application was deleted",
                       err=True)
            click.get_current_context().exit(code)

    for option in reversed([
        click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                     help="Serve as a Ray Serve deployment: on a local Ray instance (no ADDRESS) or the cluster at "
                          "ADDRESS (its nodes read the artifact paths and have bertexport installed). Needs a fixed --port."),
        click.option("--replicas", type=click.IntRange(min=1), default=None,
                     help="With --ray: replicas, each with its own copy of the models and its own batcher (default 1; "
                          "with --min/--max-replicas, the number to start with)."),
        click.option("--min-replicas", type=click.IntRange(min=0), default=None, help="With --ray: autoscale from this many..."),
        click.option("--max-replicas", type=click.IntRange(min=1), default=None, help="...to this many replicas."),
    ]):
        with_ray = option(with_ray)
    return with_ray
# -- end of serve --ray ------------------------------------------------------------------------------------


@cli.command("serve", epilog=EXIT_CODES_HELP)
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True,
              help="Port to listen on (0: a free one, printed when listening).")
@click.option("--model-name", "model_names", multiple=True,
              help="The model id clients send and /v1/models lists; repeat it for several artifacts, in order "
                   "(default: the artifact folder's name).")
@click.option("--api-key", envvar="BERTEXPORT_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health and /ready (also BERTEXPORT_API_KEY; "
                   "a key on the command line is visible to other users of this machine: prefer the variable or a file).")
@click.option("--api-key-file", type=click.Path(path_type=Path), help="As --api-key, the key being this file's first line.")
@click.option("--metrics-open", is_flag=True, help="With a key: leave /metrics open (for a scraper without the key).")
@_trusted_key_option
@_threads_option(default=None, help="Runtime threads of each model (default: the runtime's own for one model; for "
                                       "several, this machine's cores split between them).")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Coalesce concurrent requests into one batch until their texts hold this many tokens...")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="...or until the oldest request has waited this long.")
@click.option("--queue-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Requests waiting for inference; when full, new ones get 503 with Retry-After.")
@click.option("--max-texts", type=click.IntRange(min=1), default=256, show_default=True, help="Texts in one request.")
@click.option("--max-chars", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="Characters in one request (all its texts; long texts are windowed as `run` does).")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=4 << 20, show_default=True, help="Request body size.")
@click.option("--batch-size", type=click.IntRange(min=1), default=SERVE_BATCH_SIZE, show_default=True,
              help="Windows per inference call (the coalesced windows are sorted by length first; small batches pad less).")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True, help="As `run --top-k`.")
@click.option("--stride", type=click.IntRange(min=0), help="As `run --stride`.")
@click.option("--max-length", type=click.IntRange(min=8), help="As `run --max-length`.")
@click.option("--aggregation", type=click.Choice(["mean", "max"]), default="mean", show_default=True, help="As `run --aggregation`.")
@click.option("--normalize/--no-normalize", default=None, help="As `run --normalize`.")
@click.option("--grace", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM, seconds to let in-flight requests finish.")
@_ray_serve_options
def serve_cmd(artifacts, host, port, model_names, api_key, api_key_file, metrics_open, trusted_key, threads, max_batch_tokens, max_wait_ms, queue_size, max_texts,
              max_chars, max_body_bytes, batch_size, top_k, stride, max_length, aggregation, normalize, grace):
    """Serve ARTIFACTS over HTTP, without torch, routed by the request's "model":
    POST /v1/embeddings (OpenAI's shape), POST /v1/<task> (what `run --json` prints per text),
    POST /v1/rerank (cross-encoders), GET /v1/models, /health, /ready, /metrics.

    Every artifact is verified (and its signature checked with --trusted-key) before the port
    opens. Concurrent requests are batched together, per model. SIGTERM: in-flight requests
    finish, exit 143."""
    from bertexport.core.errors import Interrupted
    from bertexport.shipping.api_keys import Access, read_api_key
    from bertexport.shipping.model_routing import model_names as names_of
    from bertexport.shipping.serve import serve
    from bertexport.shipping.serve_requests import ServeOptions

    options = ServeOptions(max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms, queue_size=queue_size,
                           max_texts=max_texts, max_chars=max_chars, max_body_bytes=max_body_bytes)
    names_of(artifacts, model_names)  # duplicates and extra names: exit 2 before anything loads
    access = Access(api_key=read_api_key(api_key, api_key_file), metrics_open=metrics_open)
    if metrics_open and not access.api_key:
        click.echo("warning: --metrics-open without an API key changes nothing (every endpoint is open)", err=True)

    def listening(url, loaded):
        for _, art in loaded:
            for w in art.warnings:
                click.echo(f"warning: {w}", err=True)
        served = ", ".join(f"{name} ({art.task}, {art.name})" for name, art in loaded)
        endpoints = sorted({"POST /v1/embeddings" if art.task == "feature-extraction" else f"POST /v1/{art.task}"
                            for _, art in loaded})
        keyed = "; API key required" if access.api_key else ""
        click.echo(f"serving {served} on {url} — {', '.join(endpoints)}; GET /v1/models /health /ready /metrics{keyed}",
                   err=True)

    try:
        serve(list(artifacts), host=host, port=port, trusted_key=trusted_key, threads=threads, model_name=list(model_names),
              options=options, access=access, grace_seconds=grace, on_listening=listening,
              predictor_options=dict(batch_size=batch_size, top_k=top_k, stride=stride, max_length=max_length,
                                     aggregation=aggregation, normalize=normalize))
    except (Interrupted, KeyboardInterrupt) as e:
        code = e.exit_code if isinstance(e, Interrupted) else 130
        click.echo(f"stopped ({'SIGTERM' if code == 143 else 'interrupted'}): no new requests were accepted and the "
                   f"ones in flight were given up to {grace:g} s to finish", err=True)
        click.get_current_context().exit(code)
