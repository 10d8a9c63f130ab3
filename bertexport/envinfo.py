"""The environment a measurement or an artifact was made in."""

from __future__ import annotations

import importlib.metadata
import os
import platform

_PACKAGES = ("bertexport", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime",
             "openvino", "nncf", "tensorrt", "tokenizers", "numpy")


def package_versions(names=_PACKAGES) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
                break
        flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
        wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "avx_vnni", "fma")
        info["flags"] = [f for f in wanted if f in flags]
    except OSError:
        pass
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "packages": package_versions(),
    }
