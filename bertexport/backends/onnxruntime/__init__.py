"""ONNX Runtime backend (CPU execution provider)."""

from __future__ import annotations

from dataclasses import dataclass

from bertexport.core.errors import BackendUnavailable
from bertexport.core.options import option

MODEL_FORMAT = "onnx"


@dataclass
class RuntimeConfig:
    graph_optimization: str = option("all", "ONNX Runtime graph optimization level at load",
                                     choices=("disable", "basic", "extended", "all"))
    providers: list[str] = option(help="execution providers before the CPU one, e.g. CUDAExecutionProvider",
                                  default_factory=list)


def check_available(runtime: dict | None = None) -> None:
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailable("onnxruntime", str(e), "pip install 'bertexport[runtime]'") from e
    wanted = (runtime or {}).get("providers") or []
    missing = [p for p in wanted if p not in onnxruntime.get_available_providers()]
    if missing:
        raise BackendUnavailable(
            "onnxruntime", f"execution provider(s) {', '.join(missing)} not in this onnxruntime build "
            f"(has: {', '.join(onnxruntime.get_available_providers())})",
            "install onnxruntime-gpu on a machine with an NVIDIA GPU, e.g. inside Dockerfile.gpu")


def make_runner(model_path, runtime: dict | None = None, threads: int | None = None):
    from bertexport.backends.onnxruntime.runner import OrtRunner

    check_available()
    return OrtRunner(model_path, threads=threads, **(runtime or {}))


def versions() -> dict:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}
