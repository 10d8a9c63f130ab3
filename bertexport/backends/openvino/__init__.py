"""OpenVINO backend (CPU plugin). Runs OpenVINO IR (.xml + .bin)."""

from __future__ import annotations

from dataclasses import dataclass

from bertexport.core.errors import BackendUnavailable
from bertexport.core.options import option

MODEL_FORMAT = "openvino-ir"


@dataclass
class RuntimeConfig:
    inference_precision: str = option("f32", "precision of the ops that are not int8 (bf16 only where the CPU has it natively)",
                                      choices=("f32", "bf16", "f16"))
    performance_hint: str = option("LATENCY", "OpenVINO performance hint", choices=("LATENCY", "THROUGHPUT"))
    device: str = option("CPU", "OpenVINO device name")


_NATIVE = {"bf16": "BF16", "f16": "FP16"}


def check_available(runtime: dict | None = None) -> None:
    """OpenVINO importable, and the requested inference precision native on this CPU.

    Without native bf16 (AVX-512 BF16 / AMX) OpenVINO emulates it: measured ~40x slower
    than f32 on an AVX-512 VNNI Xeon without BF16, so that is refused, not run.
    """
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendUnavailable("openvino", str(e), "pip install 'bertexport[openvino]'") from e
    precision = (runtime or {}).get("inference_precision", "f32")
    device = (runtime or {}).get("device", "CPU")
    if precision == "bf16":
        caps = ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES")
        if _NATIVE[precision] not in caps:
            raise BackendUnavailable(
                "openvino", f"{device} has no native {precision} (capabilities: {', '.join(caps)})",
                "use openvino-fp32 or an int8 profile on this machine")


def make_runner(model_path, runtime: dict | None = None, threads: int | None = None):
    from bertexport.backends.openvino.runner import OpenVinoRunner

    check_available(runtime)
    return OpenVinoRunner(model_path, threads=threads, **(runtime or {}))


def versions() -> dict:
    import openvino

    out = {"openvino": openvino.__version__}
    try:
        import nncf

        out["nncf"] = nncf.__version__
    except ImportError:
        pass
    return out
