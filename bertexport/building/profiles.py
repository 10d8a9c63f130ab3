"""Target profiles: declarative TOML files in ``targets/`` (or any path) naming a backend,
the optimization passes that build the model for it, runtime settings, shape ranges and
the parity tolerances its validation must meet."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bertexport.judging.gates import GATES, PROFILE_RULES, Gates
from bertexport.core.errors import UserError
from bertexport.core.options import build, option
from bertexport.core.resources import data_dir

from bertexport.backends import backend_names  # noqa: E402

BACKENDS = tuple(backend_names())  # one registry: bertexport.backends


@dataclass
class Range:
    min: int
    opt: int
    max: int

    def check(self, what: str) -> None:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.min, self.opt, self.max)):
            raise ValueError(f"{what} range needs integers, got {self.min!r}/{self.opt!r}/{self.max!r}")
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"{what} range must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


@dataclass
class ValidationSpec(Gates):
    """The parity gate of a profile (the built-in validation texts, or convert's --data, vs
    the PyTorch original): thresholds from the gate registry (``bertexport.judging.gates``),
    or ``rule = NAME``, one of the registry's named profile rules (every int8 profile:
    ``int8-decisions``)."""

    min_cosine: float | None = GATES["min_cosine"].field(0.999)
    min_agreement: float | None = GATES["min_agreement"].field(0.99)
    padded_length: int = option(64, "length the padded-batch parity check pads to", min=1)
    rule: str | None = option(None, "a named gate rule of the registry instead of thresholds (docs/gates.md)",
                              choices=tuple(PROFILE_RULES))

    def validate(self):
        for name in self.thresholds():
            if GATES[name].needs_labels:
                raise ValueError(f"{name} needs labelled data: gate it with `validate` or `optimize`, not in [validation]")

    def gates(self) -> Gates:
        return Gates(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Gates)})

    def describe(self, texts: int | None = None) -> str:
        """What the gate is, in a sentence (``targets --describe``)."""
        if self.rule:
            return PROFILE_RULES[self.rule].describe(texts)
        parts = [f"{GATES[n].what} {'>=' if GATES[n].direction == 'min' else '<='} {v}" for n, v in self.gates().thresholds().items()]
        how = (f"judged on the {self.confidence:.0%} interval (an undecided gate is kept as passed, with the rows "
               "that would decide it)") if self.confidence else "judged on the point estimates"
        return f"{', '.join(parts) or 'none'}; {how}, on each parity check."


@dataclass
class LatencySpec:
    batch: int = option(1, "batch size of the build-time latency cell", min=1)
    sequence: int = option(128, "sequence length of the build-time latency cell", min=1)
    runs: int = option(30, "timed runs per side (0 skips timing)", min=0)
    warmup: int = option(5, "untimed warm-up runs", min=0)


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


def _range(raw: dict, key: str, default: Range, where: str) -> Range:
    if key not in raw.get("shapes", {}):
        return default
    value = raw["shapes"][key]
    try:
        if not isinstance(value, (dict, list)):
            raise TypeError(f"{key} must be a table {{min, opt, max}} or a list [min, opt, max], got {value!r}")
        r = Range(**value) if isinstance(value, dict) else Range(*value)
        r.check(key)
    except (TypeError, ValueError) as e:
        raise UserError(f"invalid profile {where}: shapes.{key}: {e}") from e
    return r


_TOP_KEYS = {"name", "backend", "description", "precision", "opset", "passes", "runtime", "shapes",
             "validation", "latency", "needs_calibration"}


def _validation_table(raw: dict, where: str):
    """[validation], accepting the earlier name ``min_top1_agreement`` for ``min_agreement``."""
    table = raw.get("validation", {})
    if isinstance(table, dict) and isinstance(table.get("rule"), str) and table["rule"] in PROFILE_RULES:
        given = sorted(set(table) & (set(GATES) | {"confidence", "min_top1_agreement"}))
        if given:
            raise UserError(f"invalid profile {where}: [validation] names rule {table['rule']!r} and thresholds "
                            f"({', '.join(given)}): give one or the other")
        table = PROFILE_RULES[table["rule"]].gates.given() | table
    if isinstance(table, dict) and "min_top1_agreement" in table:
        if "min_agreement" in table:
            raise UserError(f"invalid profile {where}: [validation] gives both min_agreement and min_top1_agreement (same gate)")
        table = {("min_agreement" if k == "min_top1_agreement" else k): v for k, v in table.items()}
    return table


def _runtime(backend: str, table, where: str) -> dict:
    """The [runtime] table checked against the backend's typed runtime record."""
    from bertexport.backends import runtime_config_class

    cfg = build(runtime_config_class(backend), table, f"invalid profile {where}: [runtime]")
    given = table if isinstance(table, dict) else {}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in given}


def parse_profile(raw: dict, where: str) -> TargetProfile:
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise UserError(f"invalid profile {where}: unknown key(s): {', '.join(sorted(unknown))}")
    backend = raw.get("backend")
    if backend not in BACKENDS:
        raise UserError(f"invalid profile {where}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    for key, kind in (("name", str), ("description", str), ("precision", str), ("needs_calibration", bool)):
        if key in raw and not isinstance(raw[key], kind):
            raise UserError(f"invalid profile {where}: {key} must be a {'string' if kind is str else 'boolean'}, got {raw[key]!r}")
    if not isinstance(raw.get("passes", []), list):
        raise UserError(f"invalid profile {where}: passes must be a list of [[passes]] tables")
    passes = []
    for i, p in enumerate(raw.get("passes", [])):
        if not isinstance(p, dict) or "type" not in p:
            raise UserError(f"invalid profile {where}: passes[{i}] needs a 'type'")
        cfg = {k: v for k, v in p.items() if k != "type"}
        passes.append(PassSpec(p["type"], cfg))
    from bertexport.building.passes import get_pass

    for spec in passes:  # validate pass names and their configs now, before any work
        try:
            get_pass(spec.type).make_config(spec.config)
        except UserError as e:
            raise UserError(f"invalid profile {where}: {e}") from e
    for i, spec in enumerate(passes):
        cls = get_pass(spec.type)
        if i and cls.first_only:
            raise UserError(f"invalid profile {where}: pass '{spec.type}' starts from the PyTorch model: it must be the first pass")
        for earlier in passes[:i]:
            if earlier.type in cls.not_after:
                raise UserError(f"invalid profile {where}: pass '{spec.type}' cannot follow '{earlier.type}': {cls.not_after[earlier.type]}")
    opset = raw.get("opset", 18)
    if isinstance(opset, bool) or not isinstance(opset, int) or not 14 <= opset <= 21:
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
        runtime=_runtime(backend, raw.get("runtime", {}), where),
        batch=_range(raw, "batch", Range(1, 1, 32), where),
        sequence=_range(raw, "sequence", Range(1, 128, 512), where),
        validation=build(ValidationSpec, _validation_table(raw, where), f"invalid profile {where}: [validation]"),
        latency=build(LatencySpec, raw.get("latency", {}), f"invalid profile {where}: [latency]"),
        # derived from the passes' capability records (the TOML key is still accepted)
        needs_calibration=bool(raw.get("needs_calibration", False)) or any(get_pass(p.type).needs_calibration() for p in passes),
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
