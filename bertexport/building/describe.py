"""``bertexport targets --describe NAME``: a profile's settings, or a pass's or backend's
options, rendered from the typed option records (``bertexport.core.options``)."""

from __future__ import annotations

import dataclasses

from bertexport.core.errors import UserError
from bertexport.core.options import describe


def _table(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        allowed = f" [{r['allowed']}]" if r["allowed"] else ""
        out.append(f"  {r['name']:24s} {r['type']:18s} default {r['default']!r}{allowed}")
        if r["help"]:
            out.append(f"  {'':24s} {r['help']}")
    return out


def describe_pass(name: str) -> list[str]:
    from bertexport.building.passes import get_pass

    cls = get_pass(name)
    lines = [f"pass {name}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}",
             f"  takes {cls.input_format}, makes {cls.output_format}; needs calibration text: {'yes' if cls.needs_calibration() else 'no'}"]
    cap = getattr(cls, "capability", None)
    if cap is not None:
        lines.append(f"  capability: {cap.describe()}")
    return lines + ["  options:"] + _table(describe(cls.Config))


def describe_text(name: str) -> str:
    from bertexport.backends import backend_names, runtime_config_class
    from bertexport.building.passes import CATALOG
    from bertexport.building.profiles import list_profiles, load_profile
    from bertexport.core.textdata import builtin_validation

    if name in CATALOG:
        return "\n".join(describe_pass(name))
    if name in backend_names():
        return "\n".join([f"backend {name}: [runtime] options"] + _table(describe(runtime_config_class(name))))
    if name in list_profiles() or name.endswith(".toml"):
        p = load_profile(name)
        lines = [f"profile {p.name} ({p.source})", f"  {p.description}",
                 f"  backend {p.backend} · precision {p.precision} · opset {p.opset}",
                 f"  runtime: {p.runtime or '(defaults)'}",
                 f"  shapes: batch {dataclasses.asdict(p.batch)} · sequence {dataclasses.asdict(p.sequence)}",
                 f"  parity gate: {p.validation.describe(len(builtin_validation()))}",
                 f"  parity settings: {dataclasses.asdict(p.validation)}",
                 f"  build-time latency cell: {dataclasses.asdict(p.latency)}", ""]
        for spec in p.passes:
            lines += describe_pass(spec.type)
            lines.append(f"  set by this profile: {spec.config or '(defaults)'}")
            lines.append("")
        return "\n".join(lines).rstrip()
    raise UserError(f"nothing called '{name}': not a profile ({', '.join(list_profiles())}), "
                    f"a pass ({', '.join(CATALOG)}) or a backend ({', '.join(backend_names())})")
