"""``validate``: task accuracy and agreement of an artifact against its PyTorch original on
labelled (or unlabelled) data, with CI gates and JUnit XML.

Both sides get the very same token ids (the artifact's own tokenizer), so a difference is
the compiled model's, not the tokenizer's. The comparison and the gates are the one
engine in ``bertexport.judging.compare``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bertexport.judging.compare import compare_on_data, reference_for_manifest, task_labels, task_metrics, write_junit
from bertexport.judging.gates import Gates, check_gates_fit, check_gates_resolvable, judge
from bertexport.core.errors import GateFailed
from bertexport.core.textdata import TextSet, load_texts
from bertexport.judging.settings import ValidateSettings


@dataclass
class ValidationResult:
    artifact: str
    task: str
    samples: int
    metrics: dict
    gates: dict
    failures: list[str] = field(default_factory=list)
    undecided: list[str] = field(default_factory=list)  # --confidence: the interval straddles a threshold
    within_noise: list[str] = field(default_factory=list)  # decided on the point estimate, interval straddles
    verdicts: list[dict] = field(default_factory=list)  # one record per gate (bertexport.judging.gates.Verdict)

    @property
    def passed(self) -> bool:
        return not self.failures and not self.undecided

    @property
    def verdict(self) -> str:
        return "failed" if self.failures else "undecided" if self.undecided else "passed"

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "task": self.task, "samples": self.samples, "metrics": self.metrics,
                "gates": self.gates, "verdict": self.verdict, "failures": self.failures, "undecided": self.undecided,
                "within_noise": self.within_noise, "verdicts": self.verdicts, "passed": self.passed}


def load_labelled(data: str | Path | None, text_column=None, label_column=None, limit: int | None = None) -> TextSet:
    """The data a gate is judged on (default: the built-in validation texts, unlabelled)."""
    from bertexport.core.textdata import builtin_validation

    ts = load_texts(data, text_column, label_column) if data else TextSet(builtin_validation(), source="builtin:validation")
    if limit:
        ts = TextSet(ts.texts[:limit], ts.labels[:limit] if ts.labels else None, ts.pairs[:limit] if ts.pairs else None,
                     ts.source, ts.skipped)
    return ts


def validate(artifact: str | Path, data: str | Path | None = None, *, model: str | None = None, gates: Gates | None = None,
             text_column: str | None = None, label_column: str | None = None, limit: int | None = None,
             threads: int = 1, force: bool = False, junit: str | Path | None = None, reference=None,
             trusted_key: str | Path | None = None) -> ValidationResult:
    """Raises ``GateFailed`` (exit 1) when a gate fails, ``UserError`` (exit 2) on bad input."""
    from bertexport.shipping.runtime import Artifact

    gates = (gates or Gates()).check()
    art = Artifact(artifact, threads=threads, allow_rejected=True, trusted_key=trusted_key)
    ts = load_labelled(data, text_column, label_column, limit)
    labels = task_labels(ts, art.task, art.id2label)
    check_gates_fit(gates, art.task, labels is not None)  # before the original is loaded
    check_gates_resolvable(gates, len(ts.texts), f"--data ({ts.source})" if data else "the built-in validation texts",
                           "" if data else ": pass --data")
    ref = reference or reference_for_manifest(art.manifest, model, force, threads)[1]
    with art, ref:
        comp = compare_on_data(art, ref, art.encoder.encode, ts, art.task)
    metrics = task_metrics(comp, labels, gates.level)
    d = judge(metrics, gates)
    result = ValidationResult(str(artifact), art.task, len(ts.texts), metrics, gates.given(), d.failures, d.undecided,
                              d.within_noise, [v.to_dict() for v in d.verdicts])
    if junit:
        write_junit(Path(artifact).name, art.task, gates, metrics, d, junit)
    if not result.passed:
        raise GateFailed(d.reasons(), result, result.verdict)
    return result


def validate_command(settings: ValidateSettings) -> ValidationResult:
    """``bertexport validate`` as a library call: ``validate`` with the record's gates and
    settings (a record built in code is checked here too). Raises like ``validate``."""
    s = settings
    s.validate()
    return validate(s.artifact, s.data, model=s.model, gates=s.gates, text_column=s.text_column,
                    label_column=s.label_column, limit=s.limit, threads=s.threads, force=s.force, junit=s.junit,
                    trusted_key=s.trusted_key)
