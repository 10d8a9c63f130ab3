"""Error types with the exit codes the CLI maps them to.

- ``UserError`` (exit 2): bad input or an environment that cannot do what was asked.
  Printed as one line, no traceback.
- ``GateFailed`` (exit 1): the work ran, but a quality gate (parity, accuracy) failed.
- ``Interrupted`` (exit 143): SIGTERM arrived; like KeyboardInterrupt (130) it is a
  ``BaseException``, so every ``with`` block on the way out removes what it staged.

Anything else that escapes to the CLI is a bug: exit 3, traceback to a log file.
"""

from __future__ import annotations


class BertExportError(Exception):
    exit_code = 2


class UserError(BertExportError):
    """Bad input: a missing path, an unsupported model, an unknown profile..."""

    exit_code = 2


class BackendUnavailable(UserError):
    """A backend that the request needs is not installed or cannot run on this machine."""

    def __init__(self, backend: str, reason: str, hint: str = ""):
        self.backend = backend
        self.reason = reason
        self.hint = hint
        msg = f"backend '{backend}' is not available here: {reason}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class GateFailed(BertExportError):
    """A quality gate failed; ``failures`` names each failed check."""

    exit_code = 1

    def __init__(self, failures: list[str], result=None, verdict: str = "failed"):
        self.failures = failures
        self.result = result
        self.verdict = verdict  # "failed", or "undecided" (--confidence: the data cannot decide)
        super().__init__("; ".join(failures))


class Interrupted(BaseException):
    """Raised by the SIGTERM handler so that cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int = 15):
        self.exit_code = 128 + signum
        super().__init__("terminated (SIGTERM)" if signum == 15 else f"interrupted by signal {signum}")
