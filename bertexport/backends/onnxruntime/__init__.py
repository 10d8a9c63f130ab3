"""ONNX Runtime backend (CPU execution provider)."""

from __future__ import annotations

from bertexport.errors import BackendUnavailable

MODEL_FORMAT = "onnx"


def check_available() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable("onnxruntime", str(e), "pip install onnxruntime") from e


def make_runner(model_path, runtime: dict | None = None, threads: int | None = None):
    from bertexport.backends.onnxruntime.runner import OrtRunner

    check_available()
    return OrtRunner(model_path, threads=threads, **(runtime or {}))


def versions() -> dict:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}
