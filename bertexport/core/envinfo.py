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
        info["flags"] = sorted(cpu_features())
    except OSError:
        pass
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # the kernel keeps 2 decimals
    except OSError:
        pass
    return info


_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "avx_vnni",
             "avx_vnni_int8", "fma", "asimddp", "bf16")


def cpu_count() -> int:
    """The cores this process may run on (its affinity), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_features() -> set[str]:
    """ISA extensions of this CPU that decide which recipes run natively (Linux /proc/cpuinfo;
    empty where it cannot be read). Never assumed: measured machines differ."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return {x for x in line.split(":", 1)[1].split() if x in _FEATURES}
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX-512 BF16 or AMX): where OpenVINO's bf16 is fast,
    not emulated (measured ~40x slower emulated on a Xeon without it)."""
    return bool(cpu_features() & {"avx512_bf16", "amx_bf16"})


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "packages": package_versions(),
    }
