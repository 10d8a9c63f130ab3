"""The command line: parses, calls the library, prints. No logic of its own.

``group`` holds the Click group, the exit-code contract and the options every command shares;
each other module here registers the commands of one stage on it.
"""

from __future__ import annotations

from bertexport.cli.group import cli, install_signal_handlers
from bertexport.cli import artifact, build, evaluate, run, serve  # noqa: E402,F401  (register the commands)


def main():
    install_signal_handlers()
    cli(prog_name="bertexport")
