"""Backends, one folder each. A backend module is imported lazily, and its runtime
library only when a runner is made, so a missing optional backend degrades to a clear
``BackendUnavailable`` message instead of an ImportError at startup.

Each backend package exposes:
- ``MODEL_FORMAT``: the model format its runner loads (``onnx``, ``openvino-ir``, ...);
- ``check_available(runtime)``: raises ``BackendUnavailable`` with what to install or where to run;
- ``make_runner(model_path, runtime: dict, threads: int) -> Runner``;
- ``versions() -> dict``: library versions for the manifest;
- ``RuntimeConfig``: the typed record of its ``[runtime]`` profile table.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {
    "onnxruntime": "bertexport.backends.onnxruntime",
    "openvino": "bertexport.backends.openvino",
    "tensorrt": "bertexport.backends.tensorrt",
}


def get_backend(name: str) -> ModuleType:
    from bertexport.core.errors import UserError

    if name not in _MODULES:
        raise UserError(f"unknown backend '{name}'; backends: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name])


def backend_names() -> list[str]:
    return list(_MODULES)


def runtime_config_class(name: str) -> type:
    """The typed record of a backend's ``[runtime]`` settings (checked when a profile loads)."""
    return get_backend(name).RuntimeConfig
