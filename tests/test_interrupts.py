"""A signal stops the command even where Python would drop the exception it becomes, and
what the process was writing goes with it (``bertexport.core.interrupts``).

Each case runs in its own process: signal handlers belong to a process's main thread."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

PRELUDE = """
import os, signal, sys, time
from pathlib import Path
from bertexport.core.errors import Interrupted
from bertexport.core.interrupts import install
from bertexport.core.staging import StagedFolder, WorkFolder

out = Path(sys.argv[1])
"""


def _run(body: str, out: Path, cache: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, BERTEXPORT_CACHE=str(cache), PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body), str(out)], capture_output=True,
                       text=True, env=env, timeout=120)
    return r, time.monotonic() - t0


def _left(out: Path, cache: Path) -> list[str]:
    work = cache / "work"
    return sorted(p.name for p in out.parent.iterdir()) + (sorted(p.name for p in work.iterdir()) if work.is_dir() else [])


def test_a_signal_dropped_in_a_destructor_is_delivered_again(tmp_path):
    """The handler runs at the next bytecode; when that is inside a ``__del__``, Python prints
    "Exception ignored" and drops the exception: the command would have run on to its end
    (a CI run of convert's SIGTERM test hung so)."""
    out, cache = tmp_path / "outs" / "art", tmp_path / "cache"
    out.parent.mkdir()
    r, _ = _run("""
        install()

        class Dropper:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)  # handled here, inside the destructor
                for _ in range(1000):
                    pass

        try:
            with StagedFolder(out) as staged, WorkFolder("job") as work:
                (staged.staging / "half.onnx").write_text("half")
                (work / "scratch").write_text("x")
                Dropper()  # its last reference goes at once: __del__ runs now
                for _ in range(100):
                    time.sleep(0.05)
                print("ran to the end")
        except Interrupted as e:
            print("unwound")
            sys.exit(e.exit_code)
    """, out, cache)
    assert r.returncode == 143, r
    assert r.stdout.split() == ["unwound"], r
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _left(out, cache) == []


def test_a_swallowed_signal_meets_the_last_resort(tmp_path):
    """Code that catches ``BaseException`` and carries on: after ``cleanup_seconds`` the
    folders being written are removed and the process exits with the signal's code."""
    out, cache = tmp_path / "outs" / "art", tmp_path / "cache"
    out.parent.mkdir()
    r, took = _run("""
        install(cleanup_seconds=1.0)
        with StagedFolder(out) as staged, WorkFolder("job") as work:
            (staged.staging / "half.onnx").write_text("half")
            (work / "scratch").write_text("x")
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)
            except BaseException:
                pass  # a library that swallows everything
            time.sleep(60)
            print("ran to the end")
    """, out, cache)
    assert r.returncode == 143, r
    assert "ran to the end" not in r.stdout
    assert "cleanup did not finish in 1 s" in r.stderr, r.stderr
    assert took < 30
    assert _left(out, cache) == []


def test_a_second_signal_while_unwinding_lets_the_cleanup_finish(tmp_path):
    out, cache = tmp_path / "outs" / "art", tmp_path / "cache"
    out.parent.mkdir()
    r, _ = _run("""
        install()
        try:
            with StagedFolder(out) as staged:
                (staged.staging / "half.onnx").write_text("half")
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)
                finally:  # a slow cleanup, interrupted again
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.2)
                    print("cleanup finished")
        except KeyboardInterrupt:
            sys.exit(130)
    """, out, cache)
    assert r.returncode == 130, r
    assert r.stdout.split() == ["cleanup", "finished"], r
    assert _left(out, cache) == []


def test_a_signal_while_exiting_cannot_change_the_exit_code(tmp_path):
    """Python puts the default handlers (die) back while it finalizes; a supervisor's second
    SIGTERM then turned a server's 143 into -15 (test_serve's servers, stopped twice). The
    handlers ignore both signals from the exit functions on: checked from an exit function
    that runs after bertexport's."""
    out, cache = tmp_path / "outs" / "art", tmp_path / "cache"
    out.parent.mkdir()
    r, _ = _run("""
        import atexit

        atexit.register(lambda: print("at exit, SIGTERM ignored:", signal.getsignal(signal.SIGTERM) is signal.SIG_IGN,
                                      flush=True))  # registered first: runs last
        install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Interrupted as e:
            sys.exit(e.exit_code)
    """, out, cache)
    assert r.returncode == 143, r
    assert r.stdout.strip() == "at exit, SIGTERM ignored: True", r
