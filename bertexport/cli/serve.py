"""The serve command: artifacts behind HTTP (OpenAI embeddings, task endpoints, rerank, keys, metrics)."""

from __future__ import annotations

import click

from bertexport.cli.group import EXIT_CODES_HELP, cli
from bertexport.cli.settings import options_from, settings_from
from bertexport.shipping.settings import ServeSettings


@cli.command("serve", epilog=EXIT_CODES_HELP)
@options_from(ServeSettings)
def serve_cmd(**values):
    """Serve ARTIFACTS over HTTP, without torch, routed by the request's "model":
    POST /v1/embeddings (OpenAI's shape), POST /v1/<task> (what `run --json` prints per text),
    POST /v1/rerank (cross-encoders), GET /v1/models, /health, /ready, /metrics.

    Every artifact is verified (and its signature checked with --trusted-key) before the port
    opens. Concurrent requests are batched together, per model. SIGTERM: in-flight requests
    finish, exit 143."""
    from bertexport.core.errors import Interrupted
    from bertexport.shipping.serve_command import serve_command

    settings = settings_from(ServeSettings, values, "serve")
    try:
        serve_command(settings, on_listening=lambda url, what: click.echo(f"serving {what}", err=True),
                      on_warning=lambda w: click.echo(f"warning: {w}", err=True))
    except (Interrupted, KeyboardInterrupt) as e:
        code = e.exit_code if isinstance(e, Interrupted) else 130
        how = "SIGTERM" if code == 143 else "interrupted"
        if settings.ray_address is not None:
            click.echo(f"stopped ({how}): the Ray Serve application was deleted", err=True)
        else:
            click.echo(f"stopped ({how}): no new requests were accepted and the ones in flight were given up to "
                       f"{settings.grace:g} s to finish", err=True)
        click.get_current_context().exit(code)
