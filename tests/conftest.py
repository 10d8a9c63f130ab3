from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tinymodels import build_checkpoint

# A local Ray instance (tests/test_bulk.py) stays on loopback: Ray's single-machine mode,
# read when ray is first imported (by default Ray binds the machine's interface address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


_FINISHED: dict[str, int] = {}


def pytest_sessionfinish(session, exitstatus):
    _FINISHED["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """The whole suite loads torch, ONNX Runtime, OpenVINO and Ray into one process; once (a
    clean-clone run, 2026-12-05) that process crashed in a native library's teardown after pytest
    had reported 741 passed, and the run exited 139. After pytest's own last words, leave with its
    exit status and skip the native teardown (``os._exit``; streams flushed first)."""
    if "status" in _FINISHED:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_FINISHED["status"])


def pytest_collection_modifyitems(session, config, items):
    """Tests marked ``after_all`` run last (they check what the whole suite built)."""
    items.sort(key=lambda item: item.get_closest_marker("after_all") is not None)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Exports and work files go to a per-session cache, never the user's or the repo."""
    os.environ["BERTEXPORT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(family, task) -> path of a tiny checkpoint, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    built: dict[tuple[str, str], Path] = {}

    def get(family: str, task: str = "feature-extraction") -> Path:
        key = (family, task)
        if key not in built:
            built[key] = build_checkpoint(family, task, root / f"{family}-{task}", root / "tokenizers")
        return built[key]

    return get


@pytest.fixture(scope="session")
def fp32_artifact(tiny, tmp_path_factory):
    """fp32_artifact(family, task) -> the ConvertResult of tiny(family, task) converted to
    ort-fp32, built once per session and shared: read it, never change it (copy it first).
    At the session's end every shared artifact must still verify."""
    from bertexport.building.convert import convert
    from bertexport.core.manifest import verify_files

    root = tmp_path_factory.mktemp("fp32-artifacts")
    built = {}

    def get(family: str, task: str = "feature-extraction"):
        key = (family, task)
        if key not in built:
            # the folder is named by the task: what `bertexport serve` calls the model
            built[key] = convert(str(tiny(family, task)), "ort-fp32", root / family / task, latency_runs=0)
        return built[key]

    yield get
    changed = {key: problems for key, r in built.items() if (problems := verify_files(r.artifact))}
    assert not changed, f"a test changed a shared artifact: {changed}"


@pytest.fixture(scope="session")
def keyword_model(tmp_path_factory):
    """A tiny BERT trained to detect the word 'excellent' (absent/present)."""
    from tests.tinymodels import train_keyword_classifier

    root = tmp_path_factory.mktemp("keyword")
    return train_keyword_classifier(root / "model", root / "tokenizers")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: on a shared 2-core machine two threads are
    several times slower for these tiny models."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
