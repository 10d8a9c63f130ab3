"""The GPU-free half of the TensorRT backend: optimization profile ranges from a target
profile, shape checks against them, engine/device compatibility, and which ONNX nodes
must stay fp32 in an fp16 engine. Tested on every machine."""

from __future__ import annotations

from dataclasses import dataclass

from bertexport.core.errors import UserError


@dataclass(frozen=True)
class ShapeRange:
    """min/opt/max (batch, sequence) for one TensorRT optimization profile."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))


def profile_ranges(target, extra: list[dict] | None = None) -> list[ShapeRange]:
    """One range from the target's [shapes] (batch x sequence min/opt/max), plus any extra
    profiles (``[{batch = [1, 1, 8], sequence = [1, 64, 128]}, ...]``) — TensorRT picks
    the tactics per profile, so a short-sequence profile is faster for short inputs."""
    ranges = [ShapeRange((target.batch.min, target.sequence.min), (target.batch.opt, target.sequence.opt),
                         (target.batch.max, target.sequence.max))]
    for i, p in enumerate(extra or []):
        try:
            b, s = p["batch"], p["sequence"]
            r = ShapeRange((b[0], s[0]), (b[1], s[1]), (b[2], s[2]))
        except (KeyError, IndexError, TypeError) as e:
            raise UserError(f"tensorrt profile {i}: needs batch = [min, opt, max] and sequence = [min, opt, max]") from e
        if not all(lo <= o <= hi for lo, o, hi in zip(r.min, r.opt, r.max)) or min(r.min) < 1:
            raise UserError(f"tensorrt profile {i}: needs 1 <= min <= opt <= max, got {p}")
        ranges.append(r)
    return ranges


def pick_profile(ranges: list[ShapeRange], shape: tuple[int, ...]) -> int:
    """Index of the first profile whose range holds ``shape``; a clear error otherwise
    (triton#4798: a fixed-128 profile fed 7 tokens fails at run time)."""
    for i, r in enumerate(ranges):
        if r.contains(tuple(shape)):
            return i
    spans = "; ".join(f"#{i}: batch {r.min[0]}-{r.max[0]}, sequence {r.min[1]}-{r.max[1]}" for i, r in enumerate(ranges))
    raise UserError(f"input shape {tuple(shape)} is outside every TensorRT optimization profile ({spans}); "
                    "rebuild with wider [shapes] or pad/split the input")


def check_engine_compat(built: dict, current: dict) -> None:
    """Engines are not portable across TensorRT versions or GPU architectures."""
    problems = []
    if built.get("tensorrt") and current.get("tensorrt") and built["tensorrt"] != current["tensorrt"]:
        problems.append(f"built with TensorRT {built['tensorrt']}, this is TensorRT {current['tensorrt']}")
    if built.get("compute_capability") and current.get("compute_capability") and built["compute_capability"] != current["compute_capability"]:
        problems.append(f"built for compute capability {built['compute_capability']} ({built.get('gpu')}), "
                        f"this GPU is {current['compute_capability']} ({current.get('gpu')})")
    if problems:
        raise UserError("this TensorRT engine cannot run here: " + "; ".join(problems) + "; rebuild it on this machine")


def current_device() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except ImportError:
        pass
    return {}

