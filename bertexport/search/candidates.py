"""What ``optimize`` may try: candidate recipes described as data (``Candidate``), and the
ones this machine runs natively (``candidate_recipes``: backends installed, CPU features).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable

from bertexport.core.errors import BackendUnavailable, UserError

# the backends a search can build for, with how to install each
SEARCHABLE_BACKENDS = {"onnxruntime": "pip install 'bertexport[runtime]'", "openvino": "pip install 'bertexport[openvino]'"}


@dataclass
class Candidate:
    """One build to try, described by data: which recipe, which regions stay float, on
    which checkpoint (the original, a student, or the original pruned)."""

    recipe: str
    backend: str
    precision: str
    passes: list[dict]  # [{"type": ..., **options}] as in a profile
    runtime: dict
    keep_float: list[str] = field(default_factory=list)
    student_layers: int | None = None  # the student's depth (kept beside ``student`` for older readers)
    anchor: bool = False
    student: str | None = None  # the student's shape, e.g. L3-H256-A8-F768 (``students.StudentShape.name``)
    pruned: float | None = None  # the original pruned to this fraction of its MACs (``search.pruned``)
    early_exit: bool = False  # segments of this recipe with exit heads (``search.early_exit_candidate``)

    @property
    def name(self) -> str:
        if self.pruned:
            n = f"pruned-{self.pruned:g}/{self.recipe}"
        elif self.student:
            n = f"{self.student}/{self.recipe}"
        else:
            n = self.recipe if not self.student_layers else f"student-L{self.student_layers}/{self.recipe}"
        if self.early_exit:
            n = f"early-exit/{n}"
        return n + (f"+float[{len(self.keep_float)}]" if self.keep_float else "")

    @property
    def int8(self) -> bool:
        return self.precision == "int8"

    def with_float(self, regions: list[str]) -> "Candidate":
        return dataclasses.replace(self, keep_float=list(regions), anchor=False)

    def profile(self):
        from bertexport.building.profiles import parse_profile

        passes = []
        for p in self.passes:
            p = dict(p)
            if self.keep_float and p["type"] in ("nncf-quantize", "ort-dynamic-quantize"):
                p["keep_float"] = list(self.keep_float)
            passes.append(p)
        raw = {"name": self.name, "backend": self.backend, "precision": self.precision, "passes": passes,
               "runtime": self.runtime, "description": f"optimize candidate {self.name}"}
        if self.int8:  # the gate every int8 profile has (a build judged by its profile, e.g. early exit's segments)
            raw["validation"] = {"rule": "int8-decisions"}
        return parse_profile(raw, f"optimize:{self.name}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"name": self.name}


def ort_int8_isa(features: set[str]) -> str:
    """ONNX Runtime's dynamic-int8 preset for this CPU (``ort-dynamic-quantize``'s ``isa``):
    VNNI where the CPU has it, the ARM64 dot-product preset on ARM, AVX2 otherwise."""
    if features & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "avx512_vnni"
    if "asimddp" in features:
        return "arm64"
    return "avx2"


def ort_int8_candidates(features: set[str]) -> list[Candidate]:
    """ONNX Runtime dynamic int8, fastest expected first: the transformer optimizer's fused
    graph (Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu; the fused
    Attention's Q/K/V weights quantized as one QAttention) with per-tensor and with
    per-channel weight scales — which is faster depends on the CPU, so both are measured —
    then the unfused graph, per channel. Each takes the per-region restore ladder
    (``Candidate.with_float``; regions map onto fused nodes in ``bertexport.building.graph``)."""
    isa = ort_int8_isa(features)
    fuse = {"type": "ort-transformers-optimize", "opt_level": 1}
    fused_ops = ["MatMul", "Attention"]
    return [
        Candidate(f"ort-fused-int8-pt-{isa}", "onnxruntime", "int8",
                  [fuse, {"type": "ort-dynamic-quantize", "isa": isa, "per_channel": False, "op_types": fused_ops}], {}),
        Candidate(f"ort-fused-int8-pc-{isa}", "onnxruntime", "int8",
                  [fuse, {"type": "ort-dynamic-quantize", "isa": isa, "per_channel": True, "op_types": fused_ops}], {}),
        Candidate(f"ort-int8-{isa}", "onnxruntime", "int8",
                  [{"type": "ort-dynamic-quantize", "isa": isa, "per_channel": True}], {}),
    ]


def candidate_recipes(features: set[str], backends: set[str], calib_samples: int = 300) -> list[Candidate]:
    """What this machine can run natively, fastest expected first. bf16 appears only with
    native BF16 (emulated bf16 measured ~40x slower); ORT's int8 uses the preset of this
    CPU (``ort_int8_isa``)."""
    bf16 = bool(features & {"avx512_bf16", "amx_bf16"})
    float_precision = "bf16" if bf16 else "f32"
    out = []
    if "openvino" in backends:
        convert = {"type": "openvino-convert"}
        nncf = {"type": "nncf-quantize", "preset": "mixed", "subset_size": calib_samples}
        # the anchor: NNCF's documented BERT recipe with OpenVINO's default precision on this CPU
        out.append(Candidate(f"ov-int8-{float_precision}", "openvino", "int8", [convert, nncf],
                             {"inference_precision": float_precision}, anchor=True))
        if bf16:
            out.append(Candidate("ov-int8-f32", "openvino", "int8", [convert, nncf], {"inference_precision": "f32"}))
    if "onnxruntime" in backends:
        out += ort_int8_candidates(features)
    if "openvino" in backends:
        cw = {"type": "openvino-compress-weights"}
        out.append(Candidate(f"ov-int8w-{float_precision}", "openvino", "int8-weights", [{"type": "openvino-convert"}, cw],
                             {"inference_precision": float_precision}))
        if bf16:
            out.append(Candidate("ov-bf16", "openvino", "bf16", [{"type": "openvino-convert"}], {"inference_precision": "bf16"}))
        out.append(Candidate("ov-fp32", "openvino", "fp32", [{"type": "openvino-convert"}], {"inference_precision": "f32"}))
    if "onnxruntime" in backends:
        out.append(Candidate("ort-fp32", "onnxruntime", "fp32", [], {}))
    return out


def available_backends() -> set[str]:
    import importlib.util

    return {b for b in SEARCHABLE_BACKENDS if importlib.util.find_spec(b)}


def check_backends(requested: Iterable[str] | None) -> set[str]:
    """The backends a search may use: every installed one, or only ``requested``
    (``optimize --backend``, e.g. the runtime the target device has). An unknown or
    uninstalled backend is refused here (exit 2), before any model loads."""
    installed = available_backends()
    if requested is None:
        return installed
    wanted = set(requested)
    if not wanted:
        raise UserError(f"--backend: name at least one of {', '.join(SEARCHABLE_BACKENDS)}")
    unknown = sorted(wanted - set(SEARCHABLE_BACKENDS))
    if unknown:
        raise UserError(f"--backend {unknown[0]}: optimize searches {', '.join(SEARCHABLE_BACKENDS)}")
    missing = sorted(wanted - installed)
    if missing:
        raise BackendUnavailable(missing[0], "not installed in this environment", SEARCHABLE_BACKENDS[missing[0]])
    return wanted
