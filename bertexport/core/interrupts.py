"""How a command stops on SIGINT and SIGTERM: the signal becomes an exception
(``KeyboardInterrupt``, 130; ``Interrupted``, 143) that unwinds through every ``with``
block, so staging and work folders are removed on the way out.

Two ways that exception can be lost, and what happens then:

- Python runs a signal handler at the next bytecode, which may be inside a ``__del__`` or a
  weakref callback run by the garbage collector. An exception raised there is printed as
  "Exception ignored" and dropped, and the command would run on. The unraisable hook
  recognises the dropped interrupt and delivers the signal again, so it lands in the
  command's own code.
- Library code that catches ``BaseException`` without re-raising swallows it silently. For
  that, the first signal starts a last-resort timer: if the process is still alive
  ``cleanup_seconds`` later, the folders this process is writing (``track``) are removed
  and it exits with the signal's code.

A second signal while the first one is unwinding is ignored, so the cleanup finishes, and so is
one arriving while the process exits.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from bertexport.core.errors import Interrupted

CLEANUP_SECONDS = 60.0  # from the signal to the last resort; ``serve`` adds its grace period

_writing: set[Path] = set()  # staging and work folders (or files) this process is writing now
_state: dict = {"signum": None, "raised": None, "redeliver": False, "cleanup_seconds": CLEANUP_SECONDS}


def track(path: Path) -> None:
    """``path`` is being written by this process: the last resort removes it."""
    _writing.add(Path(path))


def untrack(path: Path) -> None:
    _writing.discard(Path(path))


def allow_cleanup(seconds: float) -> None:
    """Give the unwinding after a signal at least ``seconds`` before the last resort (a server
    letting in-flight requests finish needs its grace period and some)."""
    _state["cleanup_seconds"] = max(CLEANUP_SECONDS, float(seconds))


def _raise(signum: int):
    exc = KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)
    _state["raised"] = exc
    raise exc


def _on_signal(signum, frame):
    if _state["signum"] is None:
        _state["signum"] = signum
        timer = threading.Timer(_state["cleanup_seconds"], _last_resort, args=(signum,))
        timer.daemon = True
        timer.start()
        _raise(signum)
    if _state["redeliver"]:  # the first one was dropped in a __del__: raise it again, here
        _state["redeliver"] = False
        _raise(_state["signum"])
    # a second signal while unwinding: ignored, so the cleanup finishes


def _on_unraisable(unraisable, previous=None):
    exc = unraisable.exc_value
    if exc is not None and exc is _state["raised"]:
        _state["redeliver"] = True
        threading.Thread(target=_redeliver, daemon=True).start()
        return
    (previous or sys.__unraisablehook__)(unraisable)


def _redeliver() -> None:
    """Signal again from outside the hook (a signal raised in the hook itself would be dropped
    there too), once it has returned."""
    time.sleep(0.05)
    if _state["redeliver"]:
        os.kill(os.getpid(), _state["signum"])


def _last_resort(signum: int) -> None:
    for path in list(_writing):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    with contextlib.suppress(Exception):
        sys.stderr.write(f"{'interrupted' if signum == signal.SIGINT else 'terminated (SIGTERM)'}: cleanup did not "
                         f"finish in {_state['cleanup_seconds']:g} s; staging and work folders removed, exiting\n")
        sys.stderr.flush()
    os._exit(128 + int(signum))


def install(cleanup_seconds: float | None = None) -> None:
    """SIGINT -> KeyboardInterrupt, SIGTERM -> Interrupted, in the main thread, with the two
    safeguards above."""
    _state.update(signum=None, raised=None, redeliver=False,
                  cleanup_seconds=CLEANUP_SECONDS if cleanup_seconds is None else float(cleanup_seconds))
    previous = sys.unraisablehook
    if getattr(previous, "__name__", "") != "_bertexport_unraisable":
        def _bertexport_unraisable(unraisable):
            _on_unraisable(unraisable, previous)

        sys.unraisablehook = _bertexport_unraisable
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    atexit.register(_ignore_signals)  # once more at most: registered functions run in reverse order


def _ignore_signals() -> None:
    """At exit: Python puts its own handlers back to the default (die) while it finalizes, so a
    second SIGTERM sent to a process already on its way out (a supervisor's retry) would kill it
    with -15 instead of the exit code it is returning."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
