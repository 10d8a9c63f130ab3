"""``validate``: task accuracy and agreement of an artifact against its PyTorch original on
labelled (or unlabelled) data, with CI gates and JUnit XML.

Both sides get the very same token ids (the artifact's own tokenizer), so a difference is
the compiled model's, not the tokenizer's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bertexport.errors import GateFailed, UserError
from bertexport.parity import TASK_OUTPUTS, decisions, mean_pool, primary_vectors
from bertexport.textdata import TextSet, load_texts


@dataclass
class Gates:
    max_accuracy_drop: float | None = None  # percentage points
    min_agreement: float | None = None  # fraction of equal decisions
    min_cosine: float | None = None  # min per-sample cosine (embeddings)


@dataclass
class ValidationResult:
    artifact: str
    task: str
    samples: int
    metrics: dict
    gates: dict
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "task": self.task, "samples": self.samples, "metrics": self.metrics,
                "gates": self.gates, "failures": self.failures, "passed": self.passed}


def label_ids(labels: list, id2label: dict[int, str] | None) -> np.ndarray:
    """Map data labels to the model's ids: by name first, then by index; anything else is an error."""
    if not id2label:
        raise UserError("the artifact has no labels, so labelled accuracy cannot be computed")
    by_name = {str(v).lower(): k for k, v in id2label.items()}
    ids, unknown = [], set()
    for raw in labels:
        s = str(raw).strip()
        if s.lower() in by_name:
            ids.append(by_name[s.lower()])
        elif s.lstrip("-").isdigit() and int(s) in id2label:
            ids.append(int(s))
        else:
            unknown.add(s)
    if unknown:
        raise UserError(f"labels not known to the model: {', '.join(sorted(unknown)[:10])}; "
                        f"model labels: {', '.join(f'{k}={v}' for k, v in sorted(id2label.items()))}")
    return np.asarray(ids)


def _batched(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def compare_on_data(artifact, reference, data: TextSet, batch_size: int = 16, reference_cache: dict | None = None) -> dict:
    """Run both sides on the data; returns raw per-sample material for metrics.

    ``reference_cache`` (batch index -> outputs) lets several artifacts built from one
    checkpoint share a single pass of the PyTorch original."""
    task = artifact.task
    preds_a, preds_r, cosines = [], [], []
    cache = reference_cache if reference_cache is not None else {}
    for bi, sl in enumerate(_batched(len(data.texts), batch_size)):
        feeds = artifact.encoder.encode(data.texts[sl], data.pairs[sl] if data.pairs else None)
        out_a = artifact.infer(feeds)
        if bi not in cache:
            cache[bi] = reference.infer(feeds)
        out_r = cache[bi]
        mask = feeds["attention_mask"]
        if task == "feature-extraction":
            a, r = mean_pool(out_a["last_hidden_state"], mask), mean_pool(out_r["last_hidden_state"], mask)
            cosines.extend((a * r).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(r, axis=-1)))
        else:
            preds_a.append(decisions(out_a, task, mask))
            preds_r.append(decisions(out_r, task, mask))
            va, vr = primary_vectors(out_a, task, mask), primary_vectors(out_r, task, mask)
            cosines.extend(float(np.dot(a, r) / max(np.linalg.norm(a) * np.linalg.norm(r), 1e-30)) for a, r in zip(va, vr))
    return {
        "pred_artifact": np.concatenate(preds_a) if preds_a else None,
        "pred_reference": np.concatenate(preds_r) if preds_r else None,
        "cosines": np.asarray(cosines, dtype=np.float64),
    }


def metrics_from(raw: dict, task: str, labels: np.ndarray | None) -> dict:
    m = {"cosine_min": float(raw["cosines"].min()), "cosine_mean": float(raw["cosines"].mean())}
    pa, pr = raw["pred_artifact"], raw["pred_reference"]
    if pa is not None:
        m["agreement"] = float((pa == pr).mean())
        m["decisions"] = int(pa.size)
    if labels is not None and task == "text-classification":
        m["accuracy_reference"] = float((pr == labels).mean() * 100)
        m["accuracy_artifact"] = float((pa == labels).mean() * 100)
        m["accuracy_drop"] = m["accuracy_reference"] - m["accuracy_artifact"]
    return m


def judge(metrics: dict, gates: Gates) -> list[str]:
    fails = []
    if gates.max_accuracy_drop is not None:
        if "accuracy_drop" not in metrics:
            raise UserError("--max-accuracy-drop needs labelled text-classification data")
        if metrics["accuracy_drop"] > gates.max_accuracy_drop:
            fails.append(f"accuracy drop {metrics['accuracy_drop']:.2f} points > {gates.max_accuracy_drop}")
    if gates.min_agreement is not None:
        if "agreement" not in metrics:
            raise UserError("--min-agreement needs a task with decisions (not feature-extraction)")
        if metrics["agreement"] < gates.min_agreement:
            fails.append(f"agreement {metrics['agreement']:.4f} < {gates.min_agreement}")
    if gates.min_cosine is not None and metrics["cosine_min"] < gates.min_cosine:
        fails.append(f"cosine_min {metrics['cosine_min']:.5f} < {gates.min_cosine}")
    return fails


def reference_for(manifest: dict, model: str | None, force: bool, threads: int):
    """The PyTorch original named by the manifest (or ``model``), checked to be the same checkpoint."""
    from bertexport.backends.torch.runner import TorchRunner
    from bertexport.checkpoint import load_model, resolve_checkpoint

    src = model or manifest["source"]["path"]
    ckpt = resolve_checkpoint(src, manifest["task"], allow_pickle=manifest["source"].get("weights_format") == "pickle")
    if ckpt.sha256 != manifest["source"]["sha256"] and not force:
        raise UserError(f"{src} is not the checkpoint this artifact was built from (sha256 differs); pass --force to compare anyway")
    names = [i["name"] for i in manifest["inputs"]]
    return TorchRunner(load_model(ckpt), names, list(TASK_OUTPUTS[manifest["task"]]), threads=threads)


def validate(artifact: str | Path, data: str | Path | None = None, *, model: str | None = None, gates: Gates | None = None,
             text_column: str | None = None, label_column: str | None = None, limit: int | None = None,
             threads: int = 1, force: bool = False, junit: str | Path | None = None, reference=None) -> ValidationResult:
    """Raises ``GateFailed`` (exit 1) when a gate fails, ``UserError`` (exit 2) on bad input."""
    from bertexport.runtime import Artifact
    from bertexport.textdata import TextSet, builtin_samples

    gates = gates or Gates()
    art = Artifact(artifact, threads=threads, allow_rejected=True)
    ts = load_texts(data, text_column, label_column) if data else TextSet(builtin_samples(), source="builtin:samples")
    if limit:
        ts = TextSet(ts.texts[:limit], ts.labels[:limit] if ts.labels else None, ts.pairs[:limit] if ts.pairs else None, ts.source)
    labels = label_ids(ts.labels, art.id2label) if ts.labels is not None and art.task == "text-classification" else None
    ref = reference or reference_for(art.manifest, model, force, threads)
    with art, ref:
        raw = compare_on_data(art, ref, ts)
    metrics = metrics_from(raw, art.task, labels)
    result = ValidationResult(str(artifact), art.task, len(ts.texts), metrics,
                              {k: v for k, v in gates.__dict__.items() if v is not None}, judge(metrics, gates))
    if junit:
        write_junit(result, junit)
    if not result.passed:
        raise GateFailed(result.failures, result)
    return result


def write_junit(result: ValidationResult, path: str | Path) -> None:
    import xml.etree.ElementTree as ET

    gates = result.gates or {"parity": None}
    suite = ET.Element("testsuite", name="bertexport.validate", tests=str(len(gates)),
                       failures=str(len(result.failures)))
    for gate, limit in gates.items():
        case = ET.SubElement(suite, "testcase", classname=f"bertexport.{result.task}", name=f"{Path(result.artifact).name}:{gate}")
        word = {"max_accuracy_drop": "accuracy drop", "min_agreement": "agreement", "min_cosine": "cosine_min"}.get(gate, gate)
        failed = [f for f in result.failures if f.startswith(word)]
        if failed:
            ET.SubElement(case, "failure", message=failed[0]).text = str(result.metrics)
        ET.SubElement(case, "system-out").text = f"{gate}={limit} metrics={result.metrics}"
    ET.ElementTree(suite).write(str(path), encoding="utf-8", xml_declaration=True)
