"""Target profiles: declarative TOML files in ``targets/`` (or any path) naming a backend,
the optimization passes that build the model for it, runtime settings, shape ranges and
the parity tolerances its validation must meet."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bertexport.errors import UserError
from bertexport.resources import data_dir

BACKENDS = ("onnxruntime", "openvino", "tensorrt")


@dataclass
class Range:
    min: int
    opt: int
    max: int

    def check(self, what: str) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"{what} range must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


@dataclass
class Tolerances:
    min_cosine: float = 0.999
    max_abs_diff: float | None = None
    min_top1_agreement: float | None = 0.99


@dataclass
class ValidationSpec(Tolerances):
    padded_length: int = 64


@dataclass
class LatencySpec:
    batch: int = 1
    sequence: int = 128
    runs: int = 30
    warmup: int = 5


@dataclass
class PassSpec:
    type: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class TargetProfile:
    name: str
    backend: str
    description: str = ""
    precision: str = "fp32"
    opset: int = 18
    passes: list[PassSpec] = field(default_factory=list)
    runtime: dict[str, Any] = field(default_factory=dict)
    batch: Range = field(default_factory=lambda: Range(1, 1, 32))
    sequence: Range = field(default_factory=lambda: Range(1, 128, 512))
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    latency: LatencySpec = field(default_factory=LatencySpec)
    needs_calibration: bool = False
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def profiles_dir() -> Path:
    return data_dir("targets")


def list_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(profiles_dir().glob("*.toml"))}


def _table(raw: dict, key: str, cls, where: str):
    values = raw.get(key, {})
    if not isinstance(values, dict):
        raise UserError(f"invalid profile {where}: [{key}] must be a table")
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise UserError(f"invalid profile {where}: unknown key(s) in [{key}]: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    try:
        return cls(**values)
    except TypeError as e:
        raise UserError(f"invalid profile {where}: [{key}]: {e}") from e


def _range(raw: dict, key: str, default: Range, where: str) -> Range:
    if key not in raw.get("shapes", {}):
        return default
    value = raw["shapes"][key]
    try:
        r = Range(**value) if isinstance(value, dict) else Range(*value)
        r.check(key)
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid profile {where}: shapes.{key}: {e}") from e
    return r


_TOP_KEYS = {"name", "backend", "description", "precision", "opset", "passes", "runtime", "shapes",
             "validation", "latency", "needs_calibration"}


def parse_profile(raw: dict, where: str) -> TargetProfile:
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise UserError(f"invalid profile {where}: unknown key(s): {', '.join(sorted(unknown))}")
    backend = raw.get("backend")
    if backend not in BACKENDS:
        raise UserError(f"invalid profile {where}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    passes = []
    for i, p in enumerate(raw.get("passes", [])):
        if not isinstance(p, dict) or "type" not in p:
            raise UserError(f"invalid profile {where}: passes[{i}] needs a 'type'")
        cfg = {k: v for k, v in p.items() if k != "type"}
        passes.append(PassSpec(p["type"], cfg))
    from bertexport.passes import get_pass

    for spec in passes:  # validate pass names and their configs now, before any work
        try:
            get_pass(spec.type).make_config(spec.config)
        except UserError as e:
            raise UserError(f"invalid profile {where}: {e}") from e
    opset = raw.get("opset", 18)
    if not isinstance(opset, int) or not 14 <= opset <= 21:
        raise UserError(f"invalid profile {where}: opset must be an integer in 14..21, got {opset!r}")
    shapes = raw.get("shapes", {})
    if not isinstance(shapes, dict) or set(shapes) - {"batch", "sequence"}:
        raise UserError(f"invalid profile {where}: [shapes] takes only batch and sequence")
    return TargetProfile(
        name=str(raw.get("name") or Path(where).stem),
        backend=backend,
        description=str(raw.get("description", "")),
        precision=str(raw.get("precision", "fp32")),
        opset=opset,
        passes=passes,
        runtime=dict(raw.get("runtime", {})),
        batch=_range(raw, "batch", Range(1, 1, 32), where),
        sequence=_range(raw, "sequence", Range(1, 128, 512), where),
        validation=_table(raw, "validation", ValidationSpec, where),
        latency=_table(raw, "latency", LatencySpec, where),
        needs_calibration=bool(raw.get("needs_calibration", False)),
        source=where,
    )


def load_profile(name_or_path: str | Path) -> TargetProfile:
    """A profile by name (a file in ``targets/``) or by path to a TOML file."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not (text.endswith(".toml") or path.is_file()):
        known = list_profiles()
        if text not in known:
            raise UserError(f"unknown target profile '{text}'; available: {', '.join(known)} (or a path to a .toml file)")
        path = known[text]
    if not path.is_file():
        raise UserError(f"target profile file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"invalid profile {path}: {e}") from e
    return parse_profile(raw, str(path))
