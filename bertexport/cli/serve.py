"""The serve command: one artifact behind HTTP (OpenAI embeddings, task endpoints, metrics)."""

from __future__ import annotations

from pathlib import Path

import click

from bertexport.cli.group import EXIT_CODES_HELP, _threads_option, _trusted_key_option, cli

SERVE_BATCH_SIZE = 8  # == bertexport.shipping.serve.SERVE_BATCH_SIZE (the CLI stays import-light)


@cli.command("serve", epilog=EXIT_CODES_HELP)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8000, show_default=True,
              help="Port to listen on (0: a free one, printed when listening).")
@click.option("--model-name", help="The model id clients send and /v1/models lists (default: the artifact folder's name).")
@_trusted_key_option
@_threads_option(default=None, help="Runtime threads (default: the runtime's own).")
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
def serve_cmd(artifact, host, port, model_name, trusted_key, threads, max_batch_tokens, max_wait_ms, queue_size, max_texts,
              max_chars, max_body_bytes, batch_size, top_k, stride, max_length, aggregation, normalize, grace):
    """Serve ARTIFACT over HTTP, without torch: POST /v1/embeddings (OpenAI's shape) or
    POST /v1/<task> (what `run --json` prints per text), GET /v1/models, /health, /ready, /metrics.

    The artifact is verified (and its signature checked with --trusted-key) before the port
    opens. Concurrent requests are batched together. SIGTERM: in-flight requests finish, exit 143."""
    from bertexport.core.errors import Interrupted
    from bertexport.shipping.serve import ServeOptions, serve

    options = ServeOptions(max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms, queue_size=queue_size,
                           max_texts=max_texts, max_chars=max_chars, max_body_bytes=max_body_bytes)

    def listening(url, art):
        for w in art.warnings:
            click.echo(f"warning: {w}", err=True)
        served = "POST /v1/embeddings" if art.task == "feature-extraction" else f"POST /v1/{art.task}"
        click.echo(f"serving {artifact} ({art.task}, {art.name}) on {url} — {served}; GET /v1/models /health /ready /metrics",
                   err=True)

    try:
        serve(artifact, host=host, port=port, trusted_key=trusted_key, threads=threads, model_name=model_name,
              options=options, grace_seconds=grace, on_listening=listening,
              predictor_options=dict(batch_size=batch_size, top_k=top_k, stride=stride, max_length=max_length,
                                     aggregation=aggregation, normalize=normalize))
    except (Interrupted, KeyboardInterrupt) as e:
        code = e.exit_code if isinstance(e, Interrupted) else 130
        click.echo(f"stopped ({'SIGTERM' if code == 143 else 'interrupted'}): no new requests were accepted and the "
                   f"ones in flight were given up to {grace:g} s to finish", err=True)
        click.get_current_context().exit(code)
