"""The command group and the options every command shares; maps outcomes to exit codes.

Exit codes (the same for every command):
  0   passed
  1   a quality gate failed (and only that)
  2   bad input, or an environment that cannot serve the request
  3   internal error (a bug): one line, the traceback goes to a log file in the cache
  130 interrupted (Ctrl-C), 143 terminated (SIGTERM); staging and work folders are removed
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import click

from bertexport import __version__
from bertexport.core.errors import BertExportError, GateFailed, Interrupted

EXIT_CODES_HELP = ("Exit codes: 0 passed; 1 a quality gate failed; 2 bad input or an environment that cannot "
                   "serve the request; 3 internal error (traceback in a log file); 130/143 interrupted.")
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EMFILE}


def _debug() -> bool:
    return os.environ.get("BERTEXPORT_DEBUG", "") not in ("", "0")


def write_crash_log(exc: BaseException) -> Path:
    """The full traceback of an internal error, with the command and versions, in the cache."""
    import datetime as dt
    import tempfile
    import traceback

    from bertexport.core.envinfo import package_versions

    text = (f"bertexport {__version__} internal error\ncommand: {' '.join(sys.argv)}\n"
            f"versions: {package_versions()}\n\n" + "".join(traceback.format_exception(exc)))
    name = f"crash-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        from bertexport.core.cache import cache_dir

        path = cache_dir("logs") / name
        path.write_text(text)
    except OSError:
        path = Path(tempfile.gettempdir()) / name
        path.write_text(text)
    return path


class _Group(click.Group):
    """Maps every outcome to the exit-code contract above, with one line on stderr."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except GateFailed as e:
            click.echo(f"{e.verdict.upper()}: {e}", err=True)
            ctx.exit(e.exit_code)
        except BertExportError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted — nothing written (staging and work folders removed)", err=True)
            ctx.exit(130)
        except Interrupted as e:
            click.echo(f"{e} — nothing written (staging and work folders removed)", err=True)
            ctx.exit(e.exit_code)
        except BrokenPipeError:  # the reader went away (``| head``): nothing to report
            sys.stderr.close()
            ctx.exit(0)
        except MemoryError:
            click.echo("error: out of memory; use a smaller batch, fewer texts or a machine with more memory", err=True)
            ctx.exit(2)
        except OSError as e:
            if e.errno not in _ENVIRONMENT_ERRNOS:
                self._internal(ctx, e)
            where = f" {e.filename}" if e.filename else ""
            click.echo(f"error: cannot write{where}: {e.strerror or e} (a read-only, full or protected location?)", err=True)
            ctx.exit(2)
        except Exception as e:  # a bug: one line, the traceback in a log file
            self._internal(ctx, e)

    @staticmethod
    def _internal(ctx, e: BaseException):
        if _debug():
            import traceback

            traceback.print_exception(e)
        try:
            log = write_crash_log(e)
            where = f"; full traceback in {log}"
        except OSError:
            where = ""
        click.echo(f"internal error (a bug in bertexport, please report it): {type(e).__name__}: "
                   f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}{where}", err=True)
        ctx.exit(3)


def _set_debug(ctx, param, value):
    if value:
        os.environ["BERTEXPORT_DEBUG"] = "1"
    return value


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="bertexport")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Print the traceback of internal errors (also BERTEXPORT_DEBUG=1).")
def cli():
    """Compile BERT-family checkpoints into fast, verified deployment artifacts."""


def json_option(what: str):
    """``--json PATH|-``: the same meaning on every command (``-`` is standard output)."""
    return click.option("--json", "json_out", metavar="PATH|-", help=f"Write {what} as JSON to PATH, or to standard output with '-'.")


def emit_json(target: str | None, payload) -> None:
    import json

    if not target:
        return
    text = json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n"
    if target == "-":
        click.echo(text, nl=False)
    else:
        Path(target).write_text(text)


def _say(json_out, message: str) -> None:
    """Human lines go to stderr when JSON goes to stdout."""
    click.echo(message, err=json_out == "-")


def _print_rows(rows, title):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "PyTorch original", "artifact"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["metric"], r["original"], r["artifact"])
    Console(stderr=True).print(table)


def install_signal_handlers() -> None:
    """SIGINT -> KeyboardInterrupt (130), SIGTERM -> Interrupted (143): both unwind through
    every ``with`` block, so staging and work folders are removed (``core.interrupts``)."""
    from bertexport.core.interrupts import install

    install()
