"""Post-training structured pruning of the teacher: no gradient training.

After Kwon et al., NeurIPS 2022, "A Fast Post-Training Pruning Framework for
Transformers" (github.com/WoosukKwon/retraining-free-pruning), in four steps:

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
from bertexport.students.shapes import (
    StudentShape,
    WIDTH_FAMILIES,
    _layers,
    _top,
    _width,
    head_size,
    slice_width,
    teacher_shape,
    unit_gate_gradients,
    width_prunable,
)

TASK = "text-classification"
REPORT_NAME = "prune_report.json"


# ------------------------------------------------------------------ MACs

def layer_macs(seq_len: int, hidden: int, heads: int, head_dim: int, ffn: int) -> int:
    """Multiply-accumulates of one encoder layer for one sequence of ``seq_len`` tokens."""
    inner = heads * head_dim
    projections = 4 * seq_len * hidden * inner  # Q, K, V and the output projection
    attention = 2 * seq_len * seq_len * inner  # scores and context
    return projections + attention + 2 * seq_len * hidden * ffn


def model_macs(shape: StudentShape, head_dim: int, seq_len: int) -> int:
    """MACs of the encoder layers of a stock model of ``shape``."""
    return shape.layers * layer_macs(seq_len, shape.hidden, shape.heads, head_dim, shape.ffn)


# ------------------------------------------------------------------ Fisher information

@dataclass
class MaskGradients:
    """Per-batch gradients of the loss w.r.t. the gates: heads (B, L, H), ffn (B, L, F),
    hidden (B, hidden). The empirical Fisher is the sum of squares over batches."""

    heads: np.ndarray
    ffn: np.ndarray
    hidden: np.ndarray

    def fisher(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple((g.astype(np.float64) ** 2).sum(0) for g in (self.heads, self.ffn, self.hidden))


def mask_gradients(model, batches, labels: list[np.ndarray]) -> MaskGradients:
    """Gradients of the cross-entropy against ``labels`` (one array per batch) w.r.t.
    head, FFN-neuron and hidden-dimension gates of ones, one row per batch."""
    import torch
    import torch.nn.functional as F

    def loss_of(i, pair):
        b, y = pair
        return F.cross_entropy(model(**b["inputs"]).logits, torch.as_tensor(y, dtype=torch.long))

    rows = ([], [], [])
    for grads in unit_gate_gradients(model, zip(batches, labels, strict=True), loss_of):
        for r, g in zip(rows, grads):
            r.append(g.detach().numpy().copy())
    return MaskGradients(*(np.stack(r) for r in rows))


# ------------------------------------------------------------------ search and rearrangement

def rearrange(grads: np.ndarray, keep: list[int], max_swaps: int | None = None) -> list[int]:
    """Kwon et al.'s mask rearrangement within one layer: ``grads`` (batches, units) give
    the block's empirical Fisher F = G^T G; starting from ``keep``, swap the (removed,
    kept) pair that lowers the removed set's estimated loss z^T F z most, while any does."""
    g = np.asarray(grads, dtype=np.float64)
    n = g.shape[1]
    z = np.ones(n)
    z[list(keep)] = 0.0
    if z.sum() == 0 or z.sum() == n:
        return sorted(keep)
    fisher = g.T @ g
    diag = np.diag(fisher)
    for _ in range(max_swaps if max_swaps is not None else n):
        fz = fisher @ z
        pruned, kept = np.flatnonzero(z == 1), np.flatnonzero(z == 0)
        delta = (diag[pruned][:, None] + diag[kept][None, :] - 2 * fz[pruned][:, None] + 2 * fz[kept][None, :]
                 - 2 * fisher[np.ix_(pruned, kept)])
        i, j = np.unravel_index(np.argmin(delta), delta.shape)
        if delta[i, j] >= -1e-12 * max(float(z @ fz), 1e-30):
            break
        z[pruned[i]], z[kept[j]] = 0.0, 1.0
    return sorted(int(i) for i in np.flatnonzero(z == 0))


@dataclass
class Masks:
    """What a pruned model keeps, in the teacher's numbering."""

    heads: list[list[int]]
    ffn: list[list[int]]
    hidden: list[int]
    estimate: float  # half the Fisher of what is removed (diagonal), before rearrangement

    @property
    def shape(self) -> StudentShape:
        return StudentShape(len(self.heads), len(self.hidden), len(self.heads[0]), len(self.ffn[0]))


def search_masks(grads: MaskGradients, teacher: StudentShape, seq_len: int, mac_budget: float) -> list[Masks]:
    """Candidates within ``mac_budget`` x the teacher's MACs, best Fisher estimate first:
    for every head count per layer, the most FFN neurons per layer that fit."""
    hs = head_size(teacher)
    f_heads, f_ffn, f_hidden = grads.fisher()
    limit = mac_budget * model_macs(teacher, hs, seq_len)
    out = []
    for heads in range(teacher.heads, 0, -1):
        hidden = heads * hs
        fixed = layer_macs(seq_len, hidden, heads, hs, 0) * teacher.layers
        per_neuron = 2 * seq_len * hidden * teacher.layers
        ffn = min(teacher.ffn, int((limit - fixed) // per_neuron))
        if ffn < 1:
            continue
        kept_heads = [_top(s, heads) for s in f_heads]
        kept_ffn = [_top(s, ffn) for s in f_ffn]
        kept_hidden = _top(f_hidden, hidden)
        removed = (sum(f_heads[i].sum() - f_heads[i][k].sum() for i, k in enumerate(kept_heads))
                   + sum(f_ffn[i].sum() - f_ffn[i][k].sum() for i, k in enumerate(kept_ffn))
                   + f_hidden.sum() - f_hidden[kept_hidden].sum())
        out.append(Masks(kept_heads, kept_ffn, kept_hidden, float(removed) / 2))
    return sorted(out, key=lambda m: m.estimate)


def rearranged(masks: Masks, grads: MaskGradients) -> Masks:
    """``masks`` after per-layer rearrangement (heads, FFN neurons) and of the hidden set."""
    heads = [rearrange(grads.heads[:, i], k) for i, k in enumerate(masks.heads)]
    ffn = [rearrange(grads.ffn[:, i], k) for i, k in enumerate(masks.ffn)]
    hidden = rearrange(grads.hidden, masks.hidden)
    return Masks(heads, ffn, hidden, masks.estimate)


# ------------------------------------------------------------------ layer-wise least-squares tuning

class _Stop(Exception):
    pass


def _sublayers(layer):
    """The two LayerNorms of a post-LN layer, in order: after attention, after the FFN
    (BERT's attention.output.LayerNorm / output.LayerNorm, DistilBERT's sa_layer_norm /
    output_layer_norm): their input is residual + sublayer output."""
    import torch

    norms = [m for m in layer.modules() if isinstance(m, torch.nn.LayerNorm)]
    if len(norms) != 2:
        raise RuntimeError(f"expected 2 LayerNorms in a {type(layer).__name__}, found {len(norms)}")
    return norms


class _Taps:
    """Forward pre-hooks that keep the first input of named modules for one forward pass;
    the pass stops (not run further) once ``stop`` has been reached."""

    def __init__(self, model, modules: dict, stop):
        self.model, self.modules, self.stop = model, modules, stop
        self.store: dict = {}
        self.handles: list = []

    def __enter__(self) -> "_Taps":
        def tap(name, stop):
            def hook(module, args):
                self.store[name] = args[0].detach()
                if stop:
                    raise _Stop
            return hook

        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(tap(name, module is self.stop)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False

    def run(self, inputs: dict) -> dict:
        import torch

        self.store = {}
        with torch.no_grad():
            try:
                self.model(**inputs)
            except _Stop:
                pass
        return self.store


def _real(x, mask):
    """(batch, seq, d) -> (real tokens, d) in float64."""
    import torch

    return x[mask.bool()].to(dtype=torch.float64)


def tune_masks(student, teacher, batches, hidden: list[int], ridges=(1e-6, 1e-4, 1e-2, 1.0), bound: float = 10.0,
               first_token_last: bool = True) -> list[dict]:
    """Rescale, in place, every kept head's and FFN neuron's contribution in ``student``
    (sliced from ``teacher``, keeping hidden dimensions ``hidden``) so that each
    sublayer's pre-LayerNorm output reconstructs the teacher's, layer by layer in order
    (least squares on ``batches``' real tokens; later layers see the tuned earlier ones).
    As in the paper's code the last FFN fits the first token only when
    ``first_token_last`` (what a classifier's pooler reads) and scales stay within
    [-bound, bound]; where the paper's code then stops tuning, here the ridge towards the
    untuned scales (``ridges`` x the mean diagonal of the normal matrix) grows until the
    solution is within bounds (none: that sublayer is left untuned, the next ones still
    fit). Returns per sublayer the squared reconstruction error before and after."""
    import torch

    width = _width(student)
    s_layers, _ = _layers(student)
    t_layers, _ = _layers(teacher)
    hs = head_size(teacher_shape(teacher.config))
    keep_hidden = torch.tensor(hidden)
    report = []
    for i, (s_layer, t_layer) in enumerate(zip(s_layers, t_layers, strict=True)):
        s_norms, t_norms = _sublayers(s_layer), _sublayers(t_layer)
        for part, out_name in (("attention", width.attn_out), ("ffn", width.ffn_out)):
            k = 0 if part == "attention" else 1
            first_only = first_token_last and part == "ffn" and i == len(s_layers) - 1
            proj = s_layer.get_submodule(out_name)
            w = proj.weight.detach().to(torch.float64)  # (hidden', inner)
            units = w.shape[1] // hs if part == "attention" else w.shape[1]
            gram = torch.zeros(units, units, dtype=torch.float64)
            rhs = torch.zeros(units, dtype=torch.float64)
            yy = 0.0
            wtw = w.T @ w if part == "ffn" else None
            with _Taps(teacher, {"target": t_norms[k]}, t_norms[k]) as t_taps, \
                    _Taps(student, {"x": proj, "sum": s_norms[k]}, s_norms[k]) as s_taps:
                for b in batches:
                    mask = b["inputs"]["attention_mask"]
                    if first_only:
                        mask = torch.zeros_like(mask)
                        mask[:, 0] = 1
                    t_out, s_out = t_taps.run(b["inputs"]), s_taps.run(b["inputs"])
                    target = _real(t_out["target"], mask).index_select(1, keep_hidden)
                    x, total = _real(s_out["x"], mask), _real(s_out["sum"], mask)
                    if part == "attention":
                        contrib = torch.einsum("tah,dah->tad", x.unflatten(1, (units, hs)), w.unflatten(1, (units, hs)))
                        y = target - total + contrib.sum(1)
                        gram += torch.einsum("tad,tbd->ab", contrib, contrib)
                        rhs += torch.einsum("tad,td->a", contrib, y)
                    else:
                        y = target - total + x @ w.T
                        gram += (x.T @ x) * wtw
                        rhs += (x * (y @ w)).sum(0)
                    yy += float((y * y).sum())
            ones = torch.ones(units, dtype=torch.float64)

            def error(m):
                return float(m @ gram @ m - 2 * rhs @ m + yy)

            before = error(ones)
            scale, after, used = ones, before, None
            exact = before <= 1e-10 * max(yy, 1e-30)  # nothing removed upstream: nothing to fit
            for r in (() if exact else ridges):  # the smallest ridge (towards the untuned scales) whose fit is within bounds
                lam = r * float(torch.diagonal(gram).mean()) + 1e-30
                a = gram + lam * torch.eye(units, dtype=torch.float64)
                m = torch.linalg.lstsq(a, (rhs + lam)[:, None]).solution[:, 0]
                if bool(torch.isfinite(m).all()) and float(m.abs().max()) <= bound:
                    if error(m) < before:
                        scale, after, used = m, error(m), r
                    break
            tuned = used is not None
            cols = scale.repeat_interleave(hs) if part == "attention" else scale
            with torch.no_grad():
                proj.weight.mul_(cols.to(proj.weight.dtype)[None, :])
            report.append({"layer": i, "sublayer": part, "tuned": tuned, "ridge": used, "error_before": before,
                           "error_after": after, "scale_min": float(scale.min()), "scale_max": float(scale.max())})
    return report


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


def sublayer_errors(student, teacher, batches, hidden: list[int]) -> dict[str, float]:
    """Squared error of every sublayer's pre-LayerNorm output (what ``tune_masks`` fits:
    residual + sublayer) of ``student`` against ``teacher``'s, kept hidden dimensions, real
    tokens, summed over ``batches``; keyed ``"<layer>.attention"`` / ``"<layer>.ffn"``."""
    import torch

    keep = torch.tensor(hidden)
    taps = {}
    for tag, model in (("s", student), ("t", teacher)):
        layers, _ = _layers(model)
        for i, layer in enumerate(layers):
            for part, norm in zip(("attention", "ffn"), _sublayers(layer)):
                taps[(tag, f"{i}.{part}")] = norm
    errors: dict[str, float] = {}
    with _Taps(student, {k: m for k, m in taps.items() if k[0] == "s"}, None) as s_taps, \
            _Taps(teacher, {k: m for k, m in taps.items() if k[0] == "t"}, None) as t_taps:
        for b in batches:
            mask = b["inputs"]["attention_mask"]
            s_out, t_out = s_taps.run(b["inputs"]), t_taps.run(b["inputs"])
            for (tag, key), s_val in s_out.items():
                d = _real(s_val, mask) - _real(t_out[("t", key)], mask).index_select(1, keep)
                errors[key] = errors.get(key, 0.0) + float((d * d).sum())
    return errors


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
