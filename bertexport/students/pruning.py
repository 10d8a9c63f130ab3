"""Post-training structured pruning of the teacher: no gradient training.

After Kwon et al., NeurIPS 2022, "A Fast Post-Training Pruning Framework for
Transformers" (github.com/WoosukKwon/retraining-free-pruning), in four steps (1-3 in
``prune_masks``, 4 in ``prune_tuning``; this module checks, calibrates and runs them):

1. **Fisher information** of the masks. Gates of ones are multiplied in by forward
   hooks (one per head on the attention context, one per FFN neuron on the activation,
   one per hidden dimension on every LayerNorm output: the same gates as
   ``shapes.score_importance``); the gradient of the cross-entropy loss w.r.t. every gate
   is taken per batch (as the paper's code does), and the empirical Fisher is the sum of
   their squares. The loss uses the user's labels, or, when there are none, the teacher's
   own predicted labels (``PruneResult.labels`` says which).
2. **Mask search under a MAC budget**. A stock HF config keeps the same number of heads
   and FFN neurons in every layer, and hidden size = heads x head size; so, unlike the
   paper (any count per layer, hidden never pruned), the search is over ``(heads per
   layer, FFN neurons per layer)`` with the hidden size following the heads. For every
   head count the largest FFN count within the budget is a candidate; each layer keeps its
   highest-Fisher heads and neurons (the hidden dimensions too, globally). The loss
   increase is estimated as half the Fisher of everything removed (the paper's diagonal
   approximation); the ``measure`` best-estimated candidates are then sliced and their real
   KL divergence to the teacher measured on the calibration texts (the diagonal estimate
   is crude once hidden dimensions go), and the lowest wins.
3. **Mask rearrangement**: within a layer, greedy swaps of a kept and a removed unit
   while the block-diagonal (per-layer) empirical Fisher estimate ``z^T F z / 2`` of the
   removed set ``z`` decreases (counts unchanged, so the config stays stock).
4. **Mask tuning**: layer by layer, in order, each kept head's and neuron's contribution
   to its sublayer's output is rescaled by a least-squares fit of the teacher's
   pre-LayerNorm sublayer output (residual + sublayer) from the pruned model's own inputs,
   on the calibration texts (real tokens only); solved from the normal equations with
   ``torch.linalg.lstsq`` and a ridge towards 1, the smallest that keeps every scale within
   [-10, 10] (the paper's code bounds them so, and stops tuning where they are not). The
   scales are folded into the output projection's columns, so the result is a plain
   checkpoint. The tuned scales are kept only when they lower the KL divergence to the
   teacher on the calibration texts (a per-sublayer fit is not an end-to-end fit: with
   hidden dimensions removed, each LayerNorm normalises over fewer of them than the
   teacher's did; measured: tuning then cost agreement on the tiny keyword model).

The pruned model is sliced with ``shapes.slice_width``: a model of the teacher's class
with a stock config, saved as a normal HF checkpoint folder that ``convert`` takes, with
``prune_report.json`` (which marks it as bertexport's for ``--force``). Several budgets on
one data set share step 1: ``calibrate`` once, then ``prune_calibrated`` per budget (what
``optimize --prune`` does); ``prune_data`` reads a data file first (``distill --prune``).

MACs are counted for the encoder layers at a representative sequence length (the mean
token count of the calibration texts): Q/K/V and output projections, attention scores and
context, the FFN. Embedding lookups have none; the pooler and classifier are left out
(one hidden x hidden product per text).

Only text classification is supported (the loss and the agreement are over one decision
per text); width-prunable families only (``shapes.WIDTH_FAMILIES``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bertexport.core.errors import UserError
from bertexport.students.prune_masks import MaskGradients, mask_gradients, model_macs, rearranged, search_masks
from bertexport.students.prune_tuning import tune_masks
from bertexport.students.shapes import WIDTH_FAMILIES, _width, head_size, slice_width, teacher_shape, width_prunable

TASK = "text-classification"
REPORT_NAME = "prune_report.json"


# ------------------------------------------------------------------ measuring

def _batches(tokenizer, texts: list[str], batch_size: int, max_length: int):
    """Batches of similar length (less padding); ``index`` maps rows back to ``texts``."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append({"inputs": dict(enc), "index": idx})
    return out


def _logits(model, batches) -> list:
    import torch

    with torch.inference_mode():
        return [model(**b["inputs"]).logits.double() for b in batches]


def kl_to_teacher(student, batches, teacher_logits) -> float:
    """Mean KL(teacher || student) of the decisions, per text."""
    import torch.nn.functional as F

    total, n = 0.0, 0
    for s, t in zip(_logits(student, batches), teacher_logits, strict=True):
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
        total, n = total + float(kl), n + len(s)
    return total / n


def agreement(student, batches, teacher_logits) -> float:
    same = total = 0
    for s, t in zip(_logits(student, batches), teacher_logits, strict=True):
        same += int((s.argmax(-1) == t.argmax(-1)).sum())
        total += len(s)
    return same / total


# ------------------------------------------------------------------ the whole step

@dataclass
class PruneResult:
    teacher: dict  # teacher shape
    student: dict  # pruned shape
    heads: list[list[int]]  # kept heads per layer (teacher numbering)
    ffn: list[list[int]]  # kept FFN neurons per layer
    hidden: list[int]  # kept hidden dimensions
    macs_before: int
    macs_after: int
    seq_len: int  # the representative sequence length the MACs are counted at
    mac_budget: float
    labels: str  # "given" | "teacher" (the teacher's predicted labels stood in)
    samples: int  # calibration texts (Fisher, search, tuning)
    held_out: int
    agreement: float  # with the teacher, on the held-out texts
    kl: float  # KL(teacher || pruned) per held-out text
    agreement_untuned: float  # on the held-out texts, before least-squares tuning
    tuned: bool  # least-squares scales are in the result (asked for, and lowered the calibration KL)
    calibration_kl_untuned: float  # KL(teacher || pruned) on the calibration texts, before tuning
    calibration_kl: float  # ... as returned
    candidates: list[dict] = field(default_factory=list)
    tuning: list[dict] = field(default_factory=list)
    accuracy: dict | None = None  # teacher/pruned accuracy on held-out labels, when given
    seconds: float = 0.0  # this budget's mask search, rearrangement, tuning and measuring
    calibration_seconds: float = 0.0  # the shared step (teacher outputs, mask gradients), once for all budgets
    out: str | None = None

    @property
    def mac_fraction(self) -> float:
        return self.macs_after / self.macs_before

    def to_dict(self) -> dict:
        return asdict(self) | {"mac_fraction": self.mac_fraction, "method": "post-training pruning (Kwon et al. 2022)"}


def split_held_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(calibration, held-out) indices: a seeded shuffle, ``fraction`` (at least 8) held out."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    k = max(8, int(round(n * fraction)))
    return sorted(order[k:]), sorted(order[:k])


def check_budget(mac_budget: float) -> None:
    if isinstance(mac_budget, bool) or not isinstance(mac_budget, (int, float)) or not 0 < mac_budget < 1:
        raise UserError(f"MAC budget must be a fraction of the teacher's MACs between 0 and 1 (exclusive), got {mac_budget}")


def _check_data(texts, labels, samples: int, held_out: float) -> None:
    if len(texts) < 24:
        raise UserError(f"{len(texts)} texts are too few to prune on (need >= 24: calibration and held-out)")
    if any(not isinstance(t, str) for t in texts):
        raise UserError("texts must be strings")
    if labels is not None and len(labels) != len(texts):
        raise UserError(f"{len(labels)} labels for {len(texts)} texts")
    if samples < 8:
        raise UserError(f"samples must be >= 8, got {samples}")
    if not 0 < held_out < 1:
        raise UserError(f"held-out fraction must be between 0 and 1, got {held_out}")


def _check(texts, labels, mac_budget: float, samples: int, held_out: float, measure: int) -> None:
    check_budget(mac_budget)
    _check_data(texts, labels, samples, held_out)
    if measure < 1:
        raise UserError(f"measure must be >= 1, got {measure}")


def unsupported_reason(task: str, family: str, config=None) -> str | None:
    """Why post-training pruning cannot take a checkpoint of ``task`` and ``family``
    (``config``: its config dict, for ELECTRA's embedding size), or None when it can."""
    from bertexport.students.shapes import _check_width_family

    if task != TASK:
        return f"post-training pruning supports {TASK} only (its loss and agreement are one decision per text), not {task}"
    if not width_prunable(family):
        return f"post-training pruning supports {', '.join(WIDTH_FAMILIES)}, not {family}"
    try:
        _check_width_family(family, config)
    except UserError as e:
        return str(e)
    return None


@dataclass
class Calibration:
    """What every MAC budget of one teacher on one data set shares (computed once by
    ``calibrate``): the calibration and held-out batches with the teacher's logits, the
    given label ids (None: the teacher's predictions stand in), the representative sequence
    length, and the per-batch gradients of the mask gates (the Fisher information)."""

    calib_idx: list[int]
    held_idx: list[int]
    calib_b: list
    held_b: list
    calib_t: list
    held_t: list
    labels: list[int] | None
    grads: MaskGradients
    seq_len: int
    seconds: float


def calibrate(teacher, tokenizer, texts: list[str], labels: list[int] | None = None, *, samples: int = 2048,
              held_out: float = 0.2, batch_size: int = 32, max_length: int = 128, seed: int = 0) -> Calibration:
    """Split ``texts`` (seeded: ``held_out`` of them kept out, at most ``samples`` for
    calibration), run the loaded classifier ``teacher`` on both parts and take the mask
    gradients on the calibration part: step 1, shared by every budget."""
    start = time.monotonic()
    _check_data(texts, labels, samples, held_out)
    if not width_prunable(teacher.config.model_type):
        raise UserError(f"post-training pruning supports {', '.join(WIDTH_FAMILIES)}, not {teacher.config.model_type}")
    _width(teacher)  # ELECTRA with a factorised embedding is refused here
    teacher.eval()
    calib_idx, held_idx = split_held_out(len(texts), held_out, seed)
    calib_idx = calib_idx[:samples] if len(calib_idx) <= samples else sorted(
        np.random.default_rng(seed + 1).choice(calib_idx, samples, replace=False).tolist())
    calib_b = _batches(tokenizer, [texts[i] for i in calib_idx], batch_size, max_length)
    held_b = _batches(tokenizer, [texts[i] for i in held_idx], batch_size, max_length)
    calib_t, held_t = _logits(teacher, calib_b), _logits(teacher, held_b)
    if labels is not None:
        ys = [np.array([labels[calib_idx[j]] for j in b["index"]]) for b in calib_b]
    else:
        ys = [t.argmax(-1).numpy() for t in calib_t]
    seq_len = max(1, int(round(float(np.mean([int(n) for b in calib_b for n in b["inputs"]["attention_mask"].sum(-1)])))))
    grads = mask_gradients(teacher, calib_b, ys)
    return Calibration(calib_idx, held_idx, calib_b, held_b, calib_t, held_t, None if labels is None else list(labels),
                       grads, seq_len, time.monotonic() - start)


def prune_calibrated(teacher, cal: Calibration, mac_budget: float, *, measure: int = 3, tune: bool = True):
    """Steps 2-4 for one ``mac_budget`` on a ``calibrate``d teacher (unchanged): returns
    (pruned model, PruneResult without ``out``); ``seconds`` is this budget's time,
    ``calibration_seconds`` the shared step's."""
    import torch

    start = time.monotonic()
    check_budget(mac_budget)
    if measure < 1:
        raise UserError(f"measure must be >= 1, got {measure}")
    tshape = teacher_shape(teacher.config)
    hs = head_size(tshape)
    grads, seq_len, calib_b, held_b, calib_t, held_t = cal.grads, cal.seq_len, cal.calib_b, cal.held_b, cal.calib_t, cal.held_t
    found = search_masks(grads, tshape, seq_len, mac_budget)
    if not found:
        raise UserError(f"no stock shape of {tshape.name} fits {mac_budget:.0%} of its MACs at {seq_len} tokens "
                        "(one head and one FFN neuron per layer is the smallest); raise the budget")
    table, best = [], None
    for masks in found[:measure]:
        masks = rearranged(masks, grads)
        pruned = slice_width(teacher, masks.hidden, masks.heads, masks.ffn)
        kl = kl_to_teacher(pruned, calib_b, calib_t)
        table.append({"shape": masks.shape.name, "fisher_estimate": masks.estimate, "calibration_kl": kl,
                      "macs": model_macs(masks.shape, hs, seq_len)})
        if best is None or kl < best[2]:
            best = (masks, pruned, kl)
    masks, pruned, kl_untuned = best
    agreement_untuned = agreement(pruned, held_b, held_t)
    tuning, kl_calib, tuned = [], kl_untuned, False
    if tune:  # kept only when it lowers the calibration KL: a sublayer fit is not an end-to-end fit (with hidden
        # dimensions removed, each LayerNorm normalises over fewer of them than the teacher's did)
        untuned_state = {k: v.clone() for k, v in pruned.state_dict().items()}
        tuning = tune_masks(pruned, teacher, calib_b, masks.hidden)
        kl_tuned = kl_to_teacher(pruned, calib_b, calib_t)
        if kl_tuned < kl_untuned:
            kl_calib, tuned = kl_tuned, True
        else:
            pruned.load_state_dict(untuned_state)
    accuracy = None
    labels, held_idx = cal.labels, cal.held_idx
    if labels is not None:
        gold = [torch.tensor([labels[held_idx[j]] for j in b["index"]]) for b in held_b]
        accuracy = {name: float(sum(int((l.argmax(-1) == g).sum()) for l, g in zip(logits, gold)) / len(held_idx))
                    for name, logits in (("teacher", held_t), ("pruned", _logits(pruned, held_b)))}
    result = PruneResult(
        teacher=tshape.to_dict(), student=masks.shape.to_dict(), heads=masks.heads, ffn=masks.ffn, hidden=masks.hidden,
        macs_before=model_macs(tshape, hs, seq_len), macs_after=model_macs(masks.shape, hs, seq_len), seq_len=seq_len,
        mac_budget=float(mac_budget), labels="given" if labels is not None else "teacher", samples=len(cal.calib_idx),
        held_out=len(held_idx), agreement=agreement(pruned, held_b, held_t), kl=kl_to_teacher(pruned, held_b, held_t),
        agreement_untuned=agreement_untuned, tuned=tuned, calibration_kl_untuned=kl_untuned, calibration_kl=kl_calib,
        candidates=table, tuning=tuning, accuracy=accuracy,
        seconds=time.monotonic() - start, calibration_seconds=cal.seconds)
    return pruned.eval(), result


def prune_model(teacher, tokenizer, texts: list[str], labels: list[int] | None = None, *, mac_budget: float = 0.75,
                samples: int = 2048, held_out: float = 0.2, batch_size: int = 32, max_length: int = 128,
                measure: int = 3, tune: bool = True, seed: int = 0):
    """Prune the loaded classifier ``teacher`` (unchanged) to ``mac_budget`` x its MACs:
    returns (pruned model, PruneResult without ``out``). ``labels``: model label ids per
    text, or None (the teacher's predictions stand in). ``samples`` calibration texts at
    most (the paper uses 2K); ``held_out`` of the texts are kept out for the agreement.
    Several budgets on the same data: ``calibrate`` once, then ``prune_calibrated`` each."""
    _check(texts, labels, mac_budget, samples, held_out, measure)
    cal = calibrate(teacher, tokenizer, texts, labels, samples=samples, held_out=held_out, batch_size=batch_size,
                    max_length=max_length, seed=seed)
    return prune_calibrated(teacher, cal, mac_budget, measure=measure, tune=tune)


def prune(teacher_path: str | Path, texts: list[str], labels: list | None = None, task: str | None = None,
          mac_budget: float = 0.75, out: str | Path | None = None, *, samples: int = 2048, held_out: float = 0.2,
          measure: int = 3, tune: bool = True, force: bool = False, seed: int = 0,
          threads: int | None = None) -> PruneResult:
    """Prune the classifier at ``teacher_path`` to ``mac_budget`` x its encoder MACs with no
    gradient training and, when ``out`` is given, save it as a normal HF checkpoint folder
    (weights, config, tokenizer, ``prune_report.json``). ``labels``: names or ids of the
    model's labels per text; None: the teacher's own predictions are the labels.
    ``threads``: torch's intra-op threads (None: torch's default)."""
    from bertexport.building.checkpoint import load_model, load_tokenizer, resolve_checkpoint
    from bertexport.core.staging import StagedFolder, check_destination
    from bertexport.core.textdata import label_ids

    texts = list(texts)
    _check(texts, labels, mac_budget, samples, held_out, measure)
    if threads is not None and threads < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    ckpt = resolve_checkpoint(str(teacher_path), task)
    reason = unsupported_reason(ckpt.task, ckpt.family, ckpt.config)
    if reason:
        raise UserError(reason)
    ids = list(label_ids(labels, ckpt.id2label)) if labels is not None else None
    if out is not None:
        out = Path(out).expanduser().resolve()
        check_destination(out, force, [ckpt.path], "pruned model folder")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    teacher = load_model(ckpt)
    tokenizer = load_tokenizer(ckpt)
    pruned, result = prune_model(teacher, tokenizer, texts, ids, mac_budget=mac_budget, samples=samples,
                                 held_out=held_out, measure=measure, tune=tune, seed=seed)
    if out is not None:
        with StagedFolder(out, force=force, protect=[ckpt.path], what="pruned model folder") as staged:
            pruned.save_pretrained(staged.staging, safe_serialization=True)
            tokenizer.save_pretrained(staged.staging)
            result.out = str(out)
            report = result.to_dict() | {"teacher_checkpoint": ckpt.describe()}
            (staged.staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
            staged.publish(True)
    return result


def prune_data(teacher_path: str | Path, data: str | Path, out: str | Path, *, mac_budget: float = 0.75,
               task: str | None = None, text_column: str | None = None, label_column: str | None = None,
               force: bool = False, seed: int = 0, threads: int | None = None, **options) -> PruneResult:
    """``prune`` on the texts (and labels, when the file has a label column) of a data file
    (.txt/.csv/.tsv/.jsonl): ``distill --prune``. The budget is checked before the file is read."""
    from bertexport.core.textdata import load_texts

    check_budget(mac_budget)
    ts = load_texts(data, text_column, label_column)
    return prune(teacher_path, ts.texts, ts.labels, task, mac_budget, out, force=force, seed=seed, threads=threads,
                 **options)
