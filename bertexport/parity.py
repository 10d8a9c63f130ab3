"""Output parity between a reference (the PyTorch original) and a compiled model.

Comparisons only look at real tokens: padded positions carry no meaning and differ
legitimately between runtimes. For each task one "primary vector" per sample is compared
by cosine (what a user of that task would notice), and argmax agreement is counted where
the task has a decision (classification, token labels, answer start/end, masked token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# Task -> ONNX output names (optimum's naming).
TASK_OUTPUTS = {
    "feature-extraction": ("last_hidden_state",),
    "text-classification": ("logits",),
    "token-classification": ("logits",),
    "question-answering": ("start_logits", "end_logits"),
    "fill-mask": ("logits",),
}
_TOKEN_LEVEL = {"token-classification", "fill-mask"}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1.0)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)


def _probs(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def primary_vectors(outputs: dict[str, np.ndarray], task: str, mask: np.ndarray) -> list[np.ndarray]:
    """One vector per sample (or per real token for token-level tasks): the mean-pooled
    embedding; class probabilities for classification heads (the cosine of a 2-class logit
    pair near the decision boundary swings between -1 and 1 for tiny changes, so raw
    logits would make a meaningless gate); the vocabulary logits for fill-mask; the
    start/end logits over real tokens for QA."""
    if task == "feature-extraction":
        return list(mean_pool(outputs["last_hidden_state"], mask))
    if task == "text-classification":
        return list(_probs(outputs["logits"]))
    if task in _TOKEN_LEVEL:
        logits = _probs(outputs["logits"]) if task == "token-classification" else outputs["logits"]
        return [logits[i, j] for i in range(mask.shape[0]) for j in range(mask.shape[1]) if mask[i, j]]
    if task == "question-answering":
        vecs = []
        for i in range(mask.shape[0]):
            keep = mask[i].astype(bool)
            vecs.append(np.concatenate([outputs["start_logits"][i][keep], outputs["end_logits"][i][keep]]))
        return vecs
    raise ValueError(task)


def decisions(outputs: dict[str, np.ndarray], task: str, mask: np.ndarray) -> np.ndarray | None:
    """The argmax decisions of a task, flattened over real samples/tokens."""
    if task == "text-classification":
        return outputs["logits"].argmax(-1)
    if task in _TOKEN_LEVEL:
        return outputs["logits"].argmax(-1)[mask.astype(bool)]
    if task == "question-answering":
        neg = np.where(mask.astype(bool), 0.0, -np.inf)
        return np.stack([(outputs["start_logits"] + neg).argmax(-1), (outputs["end_logits"] + neg).argmax(-1)], 1).ravel()
    return None


def min_cosine(ref: dict, out: dict, task: str, mask: np.ndarray) -> float:
    r = primary_vectors(ref, task, mask)
    o = primary_vectors(out, task, mask)
    return float(min(_cos(a, b) for a, b in zip(r, o)))


@dataclass
class Comparison:
    """Accumulated parity figures over any number of batches."""

    task: str
    max_abs_diff: float = 0.0
    _abs_sum: float = 0.0
    _abs_count: int = 0
    cosines: list[float] = field(default_factory=list)
    agree: int = 0
    decided: int = 0
    samples: int = 0

    def add(self, ref: dict[str, np.ndarray], out: dict[str, np.ndarray], mask: np.ndarray) -> None:
        for name in TASK_OUTPUTS[self.task]:
            a, b = ref[name].astype(np.float64), out[name].astype(np.float64)
            if a.shape != b.shape:
                raise ValueError(f"output {name}: shape {b.shape} differs from the reference {a.shape}")
            valid = mask.astype(bool)
            diff = np.abs(a - b) if self.task == "text-classification" else np.abs(a - b)[valid]
            if not np.all(np.isfinite(b)):
                self.max_abs_diff = float("inf")
            if diff.size:
                self.max_abs_diff = max(self.max_abs_diff, float(np.nan_to_num(diff, nan=np.inf).max()))
                self._abs_sum += float(np.nan_to_num(diff, nan=1e30).sum())
                self._abs_count += diff.size
        r, o = primary_vectors(ref, self.task, mask), primary_vectors(out, self.task, mask)
        self.cosines.extend(float(c) for c in (_cos(a, b) for a, b in zip(r, o)))
        dr, do = decisions(ref, self.task, mask), decisions(out, self.task, mask)
        if dr is not None:
            self.agree += int((dr == do).sum())
            self.decided += int(dr.size)
        self.samples += mask.shape[0]

    @property
    def mean_abs_diff(self) -> float:
        return self._abs_sum / self._abs_count if self._abs_count else 0.0

    def summary(self) -> dict:
        cos = np.nan_to_num(np.array(self.cosines or [1.0]), nan=-1.0)
        return {
            "samples": self.samples,
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self.mean_abs_diff,
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
            "top1_agreement": (self.agree / self.decided) if self.decided else None,
            "decisions": self.decided,
        }


@dataclass
class ParityResult:
    checks: dict[str, dict]  # check name (e.g. "real-lengths") -> summary
    tolerances: dict
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


def judge(checks: dict[str, dict], tol) -> list[str]:
    """Failures of each check against the tolerances (a ``profiles.Tolerances``)."""
    failures = []
    for name, s in checks.items():
        if s["cosine_min"] < tol.min_cosine or not np.isfinite(s["max_abs_diff"]):
            failures.append(f"{name}: cosine_min {s['cosine_min']:.5f} < {tol.min_cosine}")
        if tol.max_abs_diff is not None and s["max_abs_diff"] > tol.max_abs_diff:
            failures.append(f"{name}: max_abs_diff {s['max_abs_diff']:.3g} > {tol.max_abs_diff}")
        agree = s.get("top1_agreement")
        if tol.min_top1_agreement is not None and agree is not None and agree < tol.min_top1_agreement:
            failures.append(f"{name}: top1_agreement {agree:.4f} < {tol.min_top1_agreement}")
    return failures


def compare_runners(reference, candidate, encode, texts: list[str], task: str, padded_length: int) -> dict[str, dict]:
    """Parity of ``candidate`` against ``reference`` on the same texts, two ways:
    ``real-lengths`` (each text alone at its own length: exercises the dynamic sequence
    axis) and ``padded-batch`` (all texts in one batch padded to ``padded_length``:
    exercises the dynamic batch axis and the attention mask)."""
    checks = {}
    real = Comparison(task)
    for t in texts:
        feeds = encode([t], padding="longest")
        real.add(reference.infer(feeds), candidate.infer(feeds), feeds["attention_mask"])
    checks["real-lengths"] = real.summary()
    padded = Comparison(task)
    feeds = encode(texts, padding="max_length", length=padded_length)
    padded.add(reference.infer(feeds), candidate.infer(feeds), feeds["attention_mask"])
    checks["padded-batch"] = padded.summary() | {"padded_length": int(feeds["input_ids"].shape[1])}
    return checks
