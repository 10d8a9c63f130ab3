"""The losses a student is trained on (``bertexport.students.training.train_student``): logit KD
with temperature (+ cross-entropy on labels; cosine + MSE of hidden states for encoders),
TinyBERT's hidden-state MSE through learned projections where widths differ, and MiniLMv2's
Q/K/V self-attention relations (any width). The intermediate ones take the teacher's tensors
from a cache computed in one pass (``teacher_intermediates``: the mapped layers only), or run the
teacher on the fly when they would not fit it."""

from __future__ import annotations

import math

import numpy as np

from bertexport.core.errors import UserError
from bertexport.core.families import get_family, layer_count as _layer_count


def class_weights(teacher_outs: list[dict], power: float) -> tuple[list[np.ndarray] | None, dict]:
    """Each training row's weight in the logit losses of a text classifier: its teacher-predicted
    class's share of the rows to the power ``-power``, scaled to a mean of 1 over the rows (so the
    loss keeps its scale); one array per batch, and a record of the classes' rows and weights.

    Why: a small student trained on the rows as they come drops a rare class. On Reuters R8
    (2026-12-05; grain: 33 of the 4,937 training texts by the teacher's labels) the 1- and 2-layer
    students of ``optimize`` called none of the 9 test posts the teacher called grain, the 3-layer
    one 8: the rows of a rare class move the loss too little. Weighting by the inverse square root
    of the share (``power`` 0.5, the smoothed re-weighting of class-balanced losses) gave grain
    x5.33 against earn's x0.61, and a 2-layer student then called all 9 (docs/students.md), without
    letting a handful of rows dominate as the inverse share would."""
    counts: dict[int, int] = {}
    preds = [np.asarray(t["logits"]).argmax(-1) for t in teacher_outs]
    for p in preds:
        for c, n in zip(*np.unique(p, return_counts=True)):
            counts[int(c)] = counts.get(int(c), 0) + int(n)
    rows = sum(counts.values())
    record = {"power": power, "classes": {c: {"rows": n} for c, n in sorted(counts.items())}}
    if power <= 0 or len(counts) < 2:
        return None, record | {"applied": False}
    raw = {c: (n / rows) ** -power for c, n in counts.items()}
    scale = rows / sum(raw[c] * n for c, n in counts.items())
    for c in counts:
        record["classes"][c]["weight"] = round(raw[c] * scale, 4)
    return [np.asarray([raw[int(c)] * scale for c in p], dtype=np.float32) for p in preds], record | {"applied": True}


def _loss(student_out, teacher: dict, batch, task, cfg, weights=None):
    """The output losses of one batch; ``weights``: each row's weight in the logit losses of a
    text classifier (``class_weights``), None: every row 1."""
    import torch
    import torch.nn.functional as F

    mask = batch["inputs"]["attention_mask"].float()
    parts = {}
    if task == "feature-extraction":
        hs = student_out.last_hidden_state.float()  # fp32 losses whatever the step's precision
        ht = torch.as_tensor(teacher["hidden"], device=hs.device)
        ps = (hs * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        pt = (ht * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        parts["cos"] = cfg.alpha_cos * (1 - F.cosine_similarity(ps, pt, dim=-1)).mean()
        parts["mse"] = cfg.alpha_mse * (((hs - ht) ** 2).mean(-1) * mask).sum() / mask.sum()
    else:
        T = cfg.temperature
        if task == "question-answering":
            pairs = [(student_out.start_logits, teacher["start"]), (student_out.end_logits, teacher["end"])]
        else:
            pairs = [(student_out.logits, teacher["logits"])]
        kd = 0.0
        for s, t in pairs:
            s, t = s.float(), torch.as_tensor(t, device=s.device)
            kl = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="none").sum(-1) * T * T
            if kl.dim() == 2 and task != "question-answering":  # token-level: only real tokens
                kl = (kl * mask).sum() / mask.sum()
            w = None if weights is None or task != "text-classification" else torch.as_tensor(weights, device=kl.device)
            kd = kd + (kl.mean() if w is None else (kl * w).mean())
        parts["kd"] = cfg.alpha_kd * kd
        if "labels" in batch and task == "text-classification":
            labelled = batch["labels"] != -100
            if bool(labelled.any()):  # teacher-labelled variants carry no label
                ce = F.cross_entropy(student_out.logits[labelled].float(), batch["labels"][labelled], reduction="none")
                parts["ce"] = cfg.alpha_ce * (ce.mean() if w is None else (ce * w[labelled]).mean())
    return parts


# ------------------------------------------------------------------ intermediate-layer losses

def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def qkv_modules(model, layer: int):
    """The query, key and value Linear modules of transformer layer ``layer`` and which of
    their calls in one forward pass is that layer (0, or ``layer`` for ALBERT, whose one
    shared layer runs at every depth)."""
    import torch

    names = get_family(model.config.model_type).qkv
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    owners = sorted({n.rsplit(".", 1)[0] for n in linears if n.rsplit(".", 1)[-1] == names[0]}, key=_natural)
    owners = [o for o in owners if all(f"{o}.{x}" in linears for x in names)]
    if len(owners) == _layer_count(model.config):
        return [linears[f"{owners[layer]}.{x}"] for x in names], 0
    if len(owners) == 1:
        return [linears[f"{owners[0]}.{x}"] for x in names], layer
    raise UserError(f"cannot find the query/key/value projections of {type(model).__name__}; use --alpha-attention 0")


class _QKVTap:
    """Forward hooks that keep the outputs of one layer's query/key/value projections."""

    def __init__(self, model, layer: int):
        modules, self.call = qkv_modules(model, layer)
        self.calls: list[list] = [[], [], []]
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i):
        def hook(module, args, output):
            self.calls[i].append(output)
        return hook

    def take(self):
        """(q, k, v) of the last forward pass, each (batch, tokens, width)."""
        out = [c[self.call] for c in self.calls]
        self.calls = [[], [], []]
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def relation_heads(student_width: int, teacher_width: int, teacher_heads: int, wanted: int | None = None) -> int:
    """Relation heads for MiniLMv2: a count dividing both widths (so the concatenated
    Q/K/V of either model split evenly), the largest up to the teacher's head count."""
    common = math.gcd(student_width, teacher_width)
    if wanted:
        if common % wanted:
            raise UserError(f"{wanted} relation heads do not divide both widths ({student_width} and {teacher_width})")
        return wanted
    return max(h for h in range(1, max(1, teacher_heads) + 1) if common % h == 0)


def _log_relations(x, heads: int, keys):
    """log softmax(x_r x_r^T / sqrt(d_r)) per relation head r; padded keys masked out; the
    product in ``x``'s precision (bf16 under autocast), the softmax in fp32."""
    b, s, d = x.shape
    x = x.view(b, s, heads, d // heads).transpose(1, 2)
    scores = (x @ x.transpose(-1, -2)).float() / math.sqrt(d // heads)
    return scores.masked_fill(~keys[:, None, None, :], float(np.finfo(np.float32).min)).log_softmax(-1)


def relation_loss(student_qkv, teacher_qkv, attention_mask, heads: int):
    """MiniLMv2 (Wang et al. 2021): sum over Q-Q, K-K, V-V of KL(teacher relation ||
    student relation), averaged over relation heads and real query tokens."""
    import torch
    import torch.nn.functional as F

    keys = attention_mask.bool()
    queries = keys[:, None, :].float()
    total = 0.0
    for s, t in zip(student_qkv, teacher_qkv):
        ls, lt = _log_relations(s, heads, keys), _log_relations(t, heads, keys)
        kl = F.kl_div(ls, lt, log_target=True, reduction="none")
        kl = torch.where(keys[:, None, None, :], kl, torch.zeros_like(kl)).sum(-1)  # (batch, heads, queries)
        total = total + (kl * queries).sum() / (queries.sum() * heads)
    return total


def hidden_loss(student_hidden, teacher_hidden, layer_map: list[int], projections, attention_mask):
    """TinyBERT's hidden-state loss: MSE between the embeddings' outputs and between each
    student layer's output and its mapped teacher layer's (``projections[j]`` maps the
    student's width onto the teacher's when they differ), over real tokens, averaged."""
    m = attention_mask.float()[..., None]
    pairs = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(layer_map)]
    total = 0.0
    for j, (si, ti) in enumerate(pairs):
        hs, ht = student_hidden[si], teacher_hidden[ti]
        if projections is not None:
            hs = projections[j](hs)
        total = total + (((hs.float() - ht.float()) ** 2) * m).sum() / (m.sum() * ht.shape[-1])
    return total / len(pairs)


def _width(config) -> int:
    fam = get_family(config.model_type)
    return int(next(getattr(config, k) for k in fam.hidden_key if hasattr(config, k)))


def _heads(config) -> int:
    fam = get_family(config.model_type)
    return int(next(getattr(config, k) for k in fam.heads_key if hasattr(config, k)))


class _Intermediate:
    """Hidden-state and self-attention relation losses against the teacher: its tensors from
    ``cache_teacher``'s arrays where they were cached, else a teacher forward per step."""

    def __init__(self, teacher, student, layer_map: list[int], cfg):
        import torch

        self.teacher, self.student, self.layer_map, self.cfg = teacher, student, layer_map, cfg
        self.hidden = cfg.alpha_hidden > 0
        self.attention = cfg.alpha_attention > 0
        ws, wt = _width(student.config), _width(teacher.config)
        self.projections = None
        if self.hidden and ws != wt:  # trained with the student, discarded after training
            self.projections = torch.nn.ModuleList(torch.nn.Linear(ws, wt) for _ in range(len(layer_map) + 1))
            self.projections.to(next(student.parameters()).device)
        self.heads = None
        self.taps = None
        if self.attention:
            self.taps = (_QKVTap(student, len(layer_map) - 1), _QKVTap(teacher, layer_map[-1]))
        self.store = None  # a TeacherIntermediates with this student's keys mapped (``cache_teacher``)
        self.cache_record: dict | None = None

    def keys(self) -> list[tuple]:
        """The teacher tensors this student's losses read: hidden states (embeddings and mapped layers), Q/K/V."""
        keys = [("h", 0)] + [("h", t + 1) for t in self.layer_map] if self.hidden else []
        return keys + ([("qkv", self.layer_map[-1])] if self.attention else [])

    def cache_teacher(self, batches: list, folder, prefix: str, log, outputs=None) -> dict:
        """The teacher's tensors for every training batch computed once (or mapped from an earlier
        run on the same batches) into ``folder`` (``teacher_intermediates``); what was done and why.
        ``outputs`` (a ``TeacherOutputs`` of these batches not on disk yet): the same forwards'
        outputs are saved there, so the teacher runs once over the batches, not twice."""
        import time

        import torch

        from bertexport.students.teacher_intermediates import TeacherIntermediates

        if not self.active:
            self.cache_record = {"cached": False, "why": "no intermediate loss"}
            return self.cache_record
        store, keys, width = TeacherIntermediates(folder, prefix, batches), self.keys(), _width(self.teacher.config)
        why = store.refusal(keys, width)
        if why is None:
            items = [] if outputs is not None and not outputs.path.is_file() else None

            def compute(missing):
                for b in batches:  # inference mode per batch, never held across a yield
                    with torch.inference_mode():
                        o = self.teacher(**b["inputs"], output_hidden_states=self.hidden)
                        got = {k: o.hidden_states[k[1]].cpu().numpy() for k in missing if k[0] == "h"}
                        if self.attention:
                            qkv = self.taps[1].take()
                            got |= {k: np.stack([x.cpu().numpy() for x in qkv]) for k in missing if k[0] == "qkv"}
                        if items is not None:
                            items.append(outputs.item(o))
                    yield got

            t0, need = time.perf_counter(), store.bytes_needed(keys, width)
            why = store.load_or_compute(keys, width, compute)
            self.drop_captures()
            with_outputs = items is not None and len(items) == len(batches)  # a whole pass ran: its outputs kept too
            if with_outputs:
                outputs.save(items)
            if why is None:
                self.store = store
                self.cache_record = {"cached": True, "tensors": [f"{k}{i}" for k, i in keys], "bytes_written": need,
                                     "seconds": round(time.perf_counter() - t0, 2), "with_outputs": with_outputs}
                log(f"teacher intermediate states ({', '.join(self.cache_record['tensors'])}) "
                    + (f"computed once ({need / 2 ** 20:.0f} MiB, {self.cache_record['seconds']:.0f} s"
                       + (", the teacher's outputs in the same pass)" if with_outputs else ")") if need
                       else "mapped from the cache"))
                return self.cache_record
        self.cache_record = {"cached": False, "why": why}
        log(f"teacher intermediate states computed every step ({why})")
        return self.cache_record

    def parameters(self):
        return list(self.projections.parameters()) if self.projections is not None else []

    @property
    def active(self) -> bool:
        return self.hidden or self.attention

    def student_kwargs(self) -> dict:
        return {"output_hidden_states": True} if self.hidden else {}

    def parts(self, student_out, inputs, index: int | None = None) -> dict:
        """The intermediate losses of a training step on batch ``index`` (its cached teacher
        tensors; None: the teacher runs now)."""
        import torch

        parts = {}
        mask = inputs["attention_mask"]
        cached = self.store is not None and index is not None
        if cached:
            t_hidden = {k[1]: self.store.batch(k, index, mask.device) for k in self.keys() if k[0] == "h"}
        else:
            with torch.no_grad(), torch.autocast(mask.device.type, enabled=False):  # the teacher's states in fp32
                teacher_out = self.teacher(**inputs, output_hidden_states=self.hidden)
            t_hidden = teacher_out.hidden_states
        if self.hidden:
            parts["hidden"] = self.cfg.alpha_hidden * hidden_loss(student_out.hidden_states, t_hidden,
                                                                  self.layer_map, self.projections, mask)
        if self.attention:
            s_qkv = self.taps[0].take()
            t_qkv = self.store.batch(("qkv", self.layer_map[-1]), index, mask.device) if cached else self.taps[1].take()
            if self.heads is None:
                self.heads = relation_heads(s_qkv[0].shape[-1], t_qkv[0].shape[-1], _heads(self.teacher.config),
                                            self.cfg.relation_heads)
            parts["attention"] = self.cfg.alpha_attention * relation_loss(s_qkv, t_qkv, mask, self.heads)
        return parts

    def drop_captures(self):
        """Forget captures of forward passes that were not training steps (evaluation)."""
        if self.taps:
            for tap in self.taps:
                tap.calls = [[], [], []]

    def close(self):
        if self.taps:
            for tap in self.taps:
                tap.remove()
