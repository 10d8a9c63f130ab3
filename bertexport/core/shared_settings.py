"""The fields several commands' settings records share (``bertexport.cli.settings`` makes
their options): the model argument's default, ``--task``, ``--threads``, ``--trusted-key``.
One definition each, so the same flag means the same on every command."""

from __future__ import annotations

from bertexport.core.options import option
from bertexport.core.tasks import TASKS

DEFAULT_MODEL = "builtin:all-MiniLM-L6-v2"  # the model a command takes when none is given
TRUSTED_KEY_ENV = "BERTEXPORT_TRUSTED_KEY"  # the public key artifacts must be signed with (shipping.signing reads it)


def model_field():
    """MODEL: a checkpoint folder, a hub id, or the built-in default."""
    return option(DEFAULT_MODEL, "A checkpoint folder, a hub id, or the built-in all-MiniLM-L6-v2.", argument=True)


def task_field():
    """``--task``: one of the task records' names."""
    return option(None, "Override the task detected from config.json.", choices=tuple(TASKS))


def threads_field(default: int | None = 1, help: str = "Threads for PyTorch and the artifact (pinned, reported)."):
    """``--threads`` (at least 1; ``default`` None: the runtime's own choice)."""
    return option(default, help, min=1)


def trusted_key_field():
    """``--trusted-key`` (also ``BERTEXPORT_TRUSTED_KEY``): the public key an artifact must be signed with."""
    return option(None, f"Public key (PEM) the artifact must be signed with (also {TRUSTED_KEY_ENV}).",
                  envvar=TRUSTED_KEY_ENV)
