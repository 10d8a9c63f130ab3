"""Optimization passes: each step that turns one model file into another (fuse, quantize,
convert to IR, build an engine) is a ``Pass`` subclass registered by name, with its own
config dataclass. A target profile lists passes by name with their settings, so recipes
are data, and a search can combine passes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from bertexport.core.errors import UserError
from bertexport.core.options import build


@dataclass
class ModelFile:
    """A model on disk: ``path`` is the file a runtime opens; ``files`` every file it needs."""

    path: Path
    format: str  # onnx | openvino-ir | tensorrt-engine
    files: list[Path] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.files:
            self.files = [self.path]


@dataclass
class PassContext:
    """What a pass may need besides its input model."""

    workdir: Path
    input_names: list[str]
    encode: Callable[..., dict]  # encode(texts, padding=..., max_length=...) -> feeds
    calibration_texts: Callable[[], list[str]]  # loaded on demand
    threads: int = 1
    log: Callable[[str], None] = print
    family: str = ""
    task: str = ""
    model_config: dict = field(default_factory=dict)
    profile: Any = None
    torch_model: Any = None  # the PyTorch original, for passes that convert from it
    checkpoint: Any = None  # its bertexport.building.checkpoint.Checkpoint, for passes that re-export it
    output_names: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Capability:
    """What a pass makes and needs, read by people (``targets --describe``) and by the
    ``optimize`` search when it decides which candidates this machine can run."""

    backend: str  # the backend that runs what the pass makes
    precision: str  # fp32 | fp16 | bf16 | int8 | int8-weights | engine
    needs_calibration: bool = False
    fast_with: tuple[str, ...] = ()  # CPU features (any of) that make its output fast; empty: any CPU
    needs_gpu: bool = False

    def describe(self) -> str:
        parts = [f"runs on {self.backend}", f"precision {self.precision}",
                 "needs calibration text" if self.needs_calibration else "no calibration data"]
        if self.fast_with:
            parts.append(f"fast with {' or '.join(self.fast_with)}")
        if self.needs_gpu:
            parts.append("needs an NVIDIA GPU")
        return ", ".join(parts)


_REGISTRY: dict[str, type["Pass"]] = {}

# name -> module defining it; modules are imported only when a pass is asked for, so a
# profile naming an OpenVINO pass can be validated without OpenVINO installed.
CATALOG: dict[str, str] = {
    "ort-transformers-optimize": "bertexport.building.passes.ort_optimize",
    "ort-dynamic-quantize": "bertexport.building.passes.ort_quantize",
    "ort-static-quantize": "bertexport.building.passes.ort_quantize",
    "openvino-convert": "bertexport.building.passes.openvino_passes",
    "openvino-compress-weights": "bertexport.building.passes.openvino_passes",
    "nncf-quantize": "bertexport.building.passes.openvino_passes",
    "tensorrt-build": "bertexport.building.passes.tensorrt_build",
    "first-token-skip": "bertexport.building.passes.first_token_skip",
    "int8-embeddings": "bertexport.building.passes.int8_embeddings",
}


class Pass:
    name: ClassVar[str]
    Config: ClassVar[type]
    input_format: ClassVar[str] = "onnx"
    output_format: ClassVar[str] = "onnx"
    capability: ClassVar[Capability]
    first_only: ClassVar[bool] = False  # must be a profile's first pass (it starts from the PyTorch model)
    not_after: ClassVar[dict[str, str]] = {}  # pass name -> why this pass cannot come after it in a profile

    @classmethod
    def check_checkpoint(cls, family: str, task: str, config: dict) -> None:
        """Refuse (UserError) a model this pass cannot serve; called before the model loads."""

    @classmethod
    def needs_calibration(cls) -> bool:
        return cls.capability.needs_calibration

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if getattr(cls, "name", None):
            _REGISTRY[cls.name] = cls

    @classmethod
    def make_config(cls, values: dict[str, Any]):
        """The pass's config from a profile table: unknown keys, wrong types and
        out-of-range values are refused here, before any work (exit 2)."""
        return build(cls.Config, values, f"pass '{cls.name}'")

    def run(self, model: ModelFile, config, ctx: PassContext) -> ModelFile:  # pragma: no cover - interface
        raise NotImplementedError


def get_pass(name: str) -> type[Pass]:
    if name not in _REGISTRY:
        module = CATALOG.get(name)
        if module is None:
            raise UserError(f"unknown pass '{name}'; passes: {', '.join(CATALOG)}")
        import importlib

        importlib.import_module(module)
    return _REGISTRY[name]


def config_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)
