"""TensorRT backend: serialized engines built from the exported ONNX (``tensorrt-build``
pass) and run on an NVIDIA GPU.

NOT VERIFIED ON A GPU IN THIS PROJECT'S CI: the build machines have no GPU. The code is
written against the TensorRT 10 Python API and exercised by Dockerfile.gpu. What does not
need a GPU (profile ranges, shape checks, engine compatibility checks, fp32 layer
selection on the ONNX graph) lives in ``tensorrt/profiles.py`` and is tested everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from bertexport.core.errors import BackendUnavailable
from bertexport.core.options import option

MODEL_FORMAT = "tensorrt-engine"


@dataclass
class RuntimeConfig:
    device: int = option(0, "CUDA device index", min=0)

DOCKER_HINT = ("build and run inside the GPU container: docker build -f Dockerfile.gpu -t bertexport-gpu . && "
               "docker run --gpus all bertexport-gpu bertexport convert --target tensorrt-fp16 --out /out/minilm-trt")


def check_available(runtime: dict | None = None) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable("tensorrt", "the tensorrt Python package is not installed", DOCKER_HINT) from e
    try:
        import torch
    except ImportError as e:
        raise BackendUnavailable("tensorrt", "the TensorRT runner moves buffers with torch.cuda, which is missing", DOCKER_HINT) from e
    if not torch.cuda.is_available():
        raise BackendUnavailable("tensorrt", "no NVIDIA GPU is visible (torch.cuda.is_available() is False)", DOCKER_HINT)


def make_runner(model_path, runtime: dict | None = None, threads: int | None = None):
    from bertexport.backends.tensorrt.runner import TensorRtRunner

    check_available(runtime)
    return TensorRtRunner(model_path, **{k: v for k, v in (runtime or {}).items() if k in ("device",)})


def versions() -> dict:
    import tensorrt

    from bertexport.backends.tensorrt.profiles import current_device

    return {"tensorrt": tensorrt.__version__} | current_device()
