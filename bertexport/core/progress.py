"""Progress reporting for long steps. The library reports through a ``Reporter``; the
CLI passes a rich one (spinner + elapsed time per step), notebooks and tests get the
quiet default that only keeps a log."""

from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def quiet(*loggers: str):
    """Silence a library's chatter (its loggers below ERROR, its stdout/stderr progress
    bars) for the duration; what it printed is yielded as a StringIO for error messages."""
    import io
    import logging

    chatter = io.StringIO()
    objs = [logging.getLogger(n) if n != "root" else logging.getLogger() for n in loggers]
    levels = [lg.level for lg in objs]
    for lg in objs:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            yield chatter
    finally:
        for lg, lvl in zip(objs, levels):
            lg.setLevel(lvl)


class Reporter:
    """Quiet reporter: remembers what happened (``self.events``) and prints nothing."""

    def __init__(self):
        self.events: list[tuple[str, str, float]] = []

    @contextlib.contextmanager
    def step(self, title: str):
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.events.append(("failed", title, time.perf_counter() - t0))
            raise
        self.events.append(("done", title, time.perf_counter() - t0))

    def log(self, message: str) -> None:
        self.events.append(("log", message, 0.0))


class RichReporter(Reporter):
    def __init__(self, console=None):
        super().__init__()
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self._status = None

    @contextlib.contextmanager
    def step(self, title: str):
        t0 = time.perf_counter()
        with self.console.status(f"[bold]{title}[/]…") as status:
            self._status = status
            try:
                with super().step(title):
                    yield
            except BaseException:
                self.console.print(f"[red]✗[/] {title} ({time.perf_counter() - t0:.1f}s)")
                raise
            finally:
                self._status = None
        self.console.print(f"[green]✓[/] {title} [dim]({time.perf_counter() - t0:.1f}s)[/]")

    def log(self, message: str) -> None:
        super().log(message)
        self.console.print(f"  [dim]{message}[/]")
