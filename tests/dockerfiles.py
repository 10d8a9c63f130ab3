"""Dockerfiles parsed by the `dockerfile` package (BuildKit's own Go parser) in a child process:
its Go runtime segfaulted when loaded into the suite's process after Ray had started threads
there (2026-12-03), which killed the whole run. A child process keeps a crash a failed test."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

Instruction = collections.namedtuple("Instruction", "cmd sub_cmd json original start_line end_line flags value heredocs",
                                     defaults=((),))

_CHILD = ("import dockerfile, json, sys; "
          "print(json.dumps([c._asdict() for c in dockerfile.parse_file(sys.argv[1])]))")


def parse_dockerfile(path: Path) -> list[Instruction]:
    pytest.importorskip("dockerfile", reason="pip install dockerfile (BuildKit's parser; the test extra)")
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the dockerfile parser failed on {path} (exit {done.returncode}): {done.stderr[-2000:]}"
    return [Instruction(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
            for c in json.loads(done.stdout)]
