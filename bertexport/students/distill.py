"""``distill``: a smaller student from any BERT-family teacher (same family and tokenizer).

The student keeps every k-th teacher layer (or an explicit list), DistilBERT-style; or is
a shape (``--shape L3-H256-F1024``) sliced from the teacher by ``bertexport.students.shapes``
(layers by measured effect, heads/FFN neurons/hidden dimensions by importance on the
data); or is a checkpoint the user gives. ``train_student`` is the training loop (see its
docstring for the losses): logit KD (+ cross-entropy on labels, + cosine/MSE for
encoders), TinyBERT hidden-state MSE through learned projections where widths differ, and
MiniLMv2 Q/K/V self-attention relations; small data is expanded with variants the teacher
labels (``bertexport.students.augment``). The teacher's logits are computed once and cached;
batches are bucketed by length; each epoch is evaluated on held-out original texts and the
best student is kept; a checkpoint (model, projections, optimizer, schedule, RNG,
position) is written atomically so an interrupted run resumes with ``resume=True``.
Nothing is published to ``out`` until training ends.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bertexport.core.staging import StagedFolder, check_destination
from bertexport.building.checkpoint import load_model, load_tokenizer, resolve_checkpoint
from bertexport.core.errors import UserError
from bertexport.students.losses import _Intermediate, _loss
from bertexport.core.families import get_family, layer_count as _layer_count
from bertexport.students.shapes import keep_every, shrink  # noqa: F401  (the layer-drop copy lives with the shapes)
from bertexport.core.progress import Reporter
from bertexport.students import shapes as students



@dataclass
class DistillConfig:
    layers: int | None = None  # student layer count (every k-th teacher layer, last one kept)
    keep_layers: list[int] | None = None  # or explicit teacher layer indices
    student: str | None = None  # or a student checkpoint sharing the tokenizer
    shape: str | None = None  # or a student shape ("L3-H256-F1024", bertexport.students.shapes): sliced from the teacher
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    temperature: float = 2.0
    alpha_kd: float = 1.0  # KL on logits (heads)
    alpha_ce: float = 0.5  # cross-entropy on labels (when the data has them)
    alpha_cos: float = 1.0  # 1 - cosine of pooled embeddings (encoders)
    alpha_mse: float = 1.0  # MSE of last hidden states (encoders)
    alpha_hidden: float = 1.0  # MSE of every student layer's hidden states vs its mapped teacher layer (TinyBERT)
    alpha_attention: float = 1.0  # Q-Q/K-K/V-V self-attention relation KL, last student layer (MiniLMv2)
    relation_heads: int | None = None  # relation heads of alpha_attention (default: chosen from both widths)
    augment: int = 8  # teacher-labelled variants per training text (bertexport.students.augment) when the data is small
    augment_below: int = 5000  # ... i.e. has fewer texts than this
    max_length: int = 128
    eval_fraction: float = 0.1
    checkpoint_every: int = 50  # steps
    seed: int = 0
    threads: int = 1
    max_tokens_per_batch: int = 64 * 1024  # out-of-memory guard: batch_size x max_length


@dataclass
class DistillResult:
    student: Path
    report: dict = field(default_factory=dict)


def uniform_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Student layer i -> teacher layer, evenly spaced, the last student layer on the
    teacher's last (TinyBERT's uniform mapping; the identity when the depths are equal)."""
    if not 1 <= student_layers <= teacher_layers:
        raise UserError(f"a student of {student_layers} layers cannot map onto a teacher of {teacher_layers}")
    step = teacher_layers / student_layers
    return [int(round((i + 1) * step)) - 1 for i in range(student_layers)]


def default_layer_map(teacher_layers: int, keep: list[int] | None, student_layers: int) -> list[int]:
    """The kept layers when they end on the teacher's last layer (each student layer learns
    to stand in for the layer it was copied from), else uniform: either way the student's
    last layer maps onto the teacher's last, the one MiniLM distils attention from."""
    if keep and len(keep) == student_layers and keep[-1] == teacher_layers - 1:
        return list(keep)
    return uniform_layer_map(teacher_layers, student_layers)


def _check_tokenizers_match(a, b, texts: list[str]) -> None:
    if a.get_vocab() != b.get_vocab() or [a(t)["input_ids"] for t in texts[:20]] != [b(t)["input_ids"] for t in texts[:20]]:
        raise UserError("the student's tokenizer differs from the teacher's; distillation needs the same tokenizer")


class _Outputs:
    """Teacher outputs (logits, or last hidden states for encoders) for every batch,
    computed once, kept in memory and on disk (``{batch}:{name}`` arrays of one .npz)."""

    def __init__(self, path: Path):
        self.path = path

    def load_or_compute(self, teacher, batches, task: str, log) -> list[dict]:
        import torch

        if self.path.is_file():
            data = np.load(self.path, allow_pickle=False)
            out = [{k[len(f"{i}:"):]: data[k] for k in data.files if k.startswith(f"{i}:")} for i in range(len(batches))]
            log(f"teacher outputs loaded from {self.path.name} ({len(batches)} batches)")
            return out
        out = []
        with torch.inference_mode():
            for b in batches:
                o = teacher(**b["inputs"])
                item = {}
                if task == "feature-extraction":
                    item["hidden"] = o.last_hidden_state.numpy()
                elif task == "question-answering":
                    item["start"], item["end"] = o.start_logits.numpy(), o.end_logits.numpy()
                else:
                    item["logits"] = o.logits.numpy()
                out.append(item)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, **{f"{i}:{k}": v for i, item in enumerate(out) for k, v in item.items()})
        os.replace(tmp, self.path)
        log(f"teacher outputs computed for {sum(len(b['index']) for b in batches)} texts, cached in {self.path.name}")
        return out


def _length_batches(tokenizer, texts, labels, batch_size, max_length, seed):
    """Batches of similar length (less padding), in a fixed order. A label of None (a
    teacher-labelled variant) becomes -100: no cross-entropy on that row."""
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        b = {"inputs": dict(enc), "index": idx}
        if labels is not None:
            b["labels"] = torch.tensor([-100 if labels[i] is None else labels[i] for i in idx])
        batches.append(b)
    return batches


def split_eval(n: int, cfg: DistillConfig) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of ``n`` texts: a seeded shuffle, ``eval_fraction`` (>= 8) held out."""
    idx = list(range(n))
    random.Random(cfg.seed).shuffle(idx)
    n_eval = max(8, int(n * cfg.eval_fraction))
    return idx[n_eval:], idx[:n_eval]


def _evaluate(model, batches, teacher_outs, task) -> dict:
    import torch

    model.eval()
    agree = total = correct = labelled = 0
    cosines = []
    with torch.inference_mode():
        for b, t in zip(batches, teacher_outs):
            o = model(**b["inputs"])
            mask = b["inputs"]["attention_mask"].bool()
            if task == "feature-extraction":
                m = mask.float()[..., None]
                ps = (o.last_hidden_state * m).sum(1) / m.sum(1)
                pt = (torch.from_numpy(t["hidden"]) * m).sum(1) / m.sum(1)
                cosines += torch.nn.functional.cosine_similarity(ps, pt, dim=-1).tolist()
                continue
            if task == "question-answering":
                s, tt = o.start_logits.argmax(-1), torch.from_numpy(t["start"]).argmax(-1)
            elif task == "text-classification":
                s, tt = o.logits.argmax(-1), torch.from_numpy(t["logits"]).argmax(-1)
            else:
                s, tt = o.logits.argmax(-1)[mask], torch.from_numpy(t["logits"]).argmax(-1)[mask]
            agree += int((s == tt).sum())
            total += int(s.numel())
            if "labels" in b and task == "text-classification":
                correct += int((s == b["labels"]).sum())
                labelled += len(b["labels"])
    model.train()
    out = {}
    if cosines:
        out["cosine_mean"] = float(np.mean(cosines))
        out["score"] = out["cosine_mean"]
    else:
        out["agreement"] = agree / max(total, 1)
        out["score"] = out["agreement"]
    if labelled:
        out["accuracy"] = correct / labelled
    return out


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


# ------------------------------------------------------------------ training data

_RESUME_IGNORES = ("threads", "checkpoint_every")


def _training_data(texts, labels, train_idx, eval_idx, cfg: DistillConfig) -> dict:
    """The training rows: the training split's texts (with their labels) and, when the data
    is small, ``cfg.augment`` variants of each (no label: the teacher labels them). Held-out
    texts are never varied and no variant equals one."""
    from bertexport.students.augment import variants

    train_texts = [texts[i] for i in train_idx]
    train_labels = [labels[i] for i in train_idx] if labels is not None else None
    extra: list[str] = []
    if cfg.augment > 0 and len(texts) < cfg.augment_below:
        extra = variants(train_texts, cfg.augment, cfg.seed, exclude={texts[i] for i in eval_idx})
    return {"texts": train_texts + extra,
            "labels": (train_labels + [None] * len(extra)) if train_labels is not None else None,
            "originals": len(train_texts), "augmented": len(extra)}


def _inputs_digest(teacher_model, texts, labels, task, cfg: DistillConfig) -> str:
    from bertexport.core.hashing import cache_key

    keys = ("batch_size", "max_length", "seed", "eval_fraction", "augment", "augment_below")
    teacher_config = {k: v for k, v in teacher_model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    return cache_key(texts, labels, task, teacher_config, {k: getattr(cfg, k) for k in keys})


def _prepare_work(work: Path, digest: str) -> None:
    """``work`` holds one run's caches: refuse to resume another run's checkpoint, drop stale caches."""
    stamp = work / "inputs.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("digest") != digest:
        if (work / "checkpoint.pt").is_file():
            raise UserError(f"{work} holds an interrupted run on other data or settings; start again without resuming")
        for f in work.iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"digest": digest}) + "\n")


def _means(values: list[float]) -> dict:
    k = max(1, len(values) // 10)
    return {"first_10pct": float(np.mean(values[:k])), "last_10pct": float(np.mean(values[-k:])), "steps": len(values)}


# ------------------------------------------------------------------ the training loop

def train_student(teacher_model, student_model, tokenizer, texts: list[str], labels: list | None, task: str,
                  cfg: DistillConfig, work: Path, reporter: Reporter | None = None, layer_map: list[int] | None = None,
                  *, on_step: Callable[[int, float], None] | None = None, teacher_cache: Path | None = None):
    """Distil ``teacher_model`` into ``student_model`` (same family and tokenizer) on
    ``texts`` (``labels``: label ids, or None). Returns ``(best student, report)``.

    Losses (each weighted by its ``cfg.alpha_*``; a 0 turns it off):
    - ``kd``: temperature-scaled KL on the teacher's logits (start/end for QA); ``ce``:
      cross-entropy on labels where rows have them; encoders: ``cos`` + ``mse`` on the
      pooled / last hidden states;
    - ``hidden`` (TinyBERT): MSE between the embedding outputs and between each student
      layer's hidden states and its mapped teacher layer's (``layer_map[i]`` = the teacher
      layer of student layer i; default ``uniform_layer_map``); where the widths differ a
      learned ``nn.Linear`` per mapped layer projects the student onto the teacher's width;
      the projections train with the student and are discarded;
    - ``attention`` (MiniLMv2): Q-Q, K-K, V-V scaled dot-product relations of the last
      student layer vs teacher layer ``layer_map[-1]``, split into relation heads that
      divide both widths (any student width), KL summed over the three; Q/K/V are caught
      by forward hooks on the query/key/value Linear modules.
    Defaults alpha_hidden = alpha_attention = 1.0, as the sources weigh them (TinyBERT sums
    its layer losses unweighted, MiniLMv2 sums Q-Q, K-K and V-V unweighted): both parts are
    scale-free enough for that (a KL between distributions; an MSE of LayerNorm outputs) and
    both are the published objectives that beat logit-only KD for shallow students
    (TinyBERT 89.3-90.7 -> 91.5 on SST-2 with augmentation; attention transfer the
    strongest single objective, arXiv 2305.15032). Not tuned here on real models yet.

    Data: a seeded split holds out ``cfg.eval_fraction`` of ``texts`` (originals only,
    never augmented); when there are fewer than ``cfg.augment_below`` texts,
    ``cfg.augment`` variants of every training text (``bertexport.students.augment``) are added and
    labelled by the teacher (the student learns its soft outputs on them). The teacher's
    logits for every training and held-out row are computed once and cached in ``work``
    (teacher-train.npz, teacher-eval.npz); its intermediate outputs (hidden states, Q/K/V)
    are computed on the fly under no_grad, per batch: hidden states of every layer for every
    batch would not fit a cache.

    Resumable: ``work/checkpoint.pt`` (model, projections, optimizer, schedule, RNG,
    position) is written atomically every ``cfg.checkpoint_every`` steps and every epoch; a
    call finding it continues from there (same data and settings, else UserError). Each
    epoch is evaluated on the held-out texts and the best student is kept in work/best.
    """
    import torch
    from transformers import get_linear_schedule_with_warmup

    reporter = reporter or Reporter()
    work = Path(work)
    student = student_model
    teacher_model.eval()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    n_teacher, n_student = _layer_count(teacher_model.config), _layer_count(student.config)
    layer_map = list(layer_map) if layer_map is not None else uniform_layer_map(n_teacher, n_student)
    if len(layer_map) != n_student or any(not 0 <= t < n_teacher for t in layer_map):
        raise UserError(f"layer map {layer_map} must give a teacher layer (0..{n_teacher - 1}) for each of the "
                        f"student's {n_student} layers")
    if cfg.augment < 0 or cfg.alpha_hidden < 0 or cfg.alpha_attention < 0:
        raise UserError("augment, alpha_hidden and alpha_attention must be >= 0")

    digest = _inputs_digest(teacher_model, texts, labels, task, cfg)
    _prepare_work(work, digest)
    train_idx, eval_idx = split_eval(len(texts), cfg)
    data = _training_data(texts, labels, train_idx, eval_idx, cfg)
    if data["augmented"]:
        reporter.log(f"{data['augmented']} variants of {data['originals']} training texts, labelled by the teacher")
    train_b = _length_batches(tokenizer, data["texts"], data["labels"], cfg.batch_size, cfg.max_length, cfg.seed)
    eval_b = _length_batches(tokenizer, [texts[i] for i in eval_idx], [labels[i] for i in eval_idx] if labels is not None else None,
                             cfg.batch_size, cfg.max_length, cfg.seed)
    with reporter.step("teacher outputs (computed once, cached)"):
        # ``teacher_cache``: a folder of this teacher's outputs shared by several students (the
        # digest covers the texts, labels, task and batching; the folder must be the teacher's own)
        where = (Path(teacher_cache), f"{digest[:20]}-") if teacher_cache else (work, "")
        where[0].mkdir(parents=True, exist_ok=True)
        teacher_train = _Outputs(where[0] / f"{where[1]}teacher-train.npz").load_or_compute(teacher_model, train_b, task, reporter.log)
        teacher_eval = _Outputs(where[0] / f"{where[1]}teacher-eval.npz").load_or_compute(teacher_model, eval_b, task, reporter.log)

    inter = _Intermediate(teacher_model, student, layer_map, cfg)
    try:
        steps_per_epoch = len(train_b)
        total = cfg.epochs * steps_per_epoch
        opt = torch.optim.AdamW(list(student.parameters()) + inter.parameters(), lr=cfg.lr, weight_decay=0.01)
        sched = get_linear_schedule_with_warmup(opt, int(0.06 * total), total)
        state = {"step": 0, "best": -math.inf, "history": [], "parts": {}, "resumed_from_step": None}
        if (work / "checkpoint.pt").is_file():
            saved = torch.load(work / "checkpoint.pt", weights_only=False)
            now = {k: v for k, v in asdict(cfg).items() if k not in _RESUME_IGNORES}
            then = {k: v for k, v in saved["config"].items() if k not in _RESUME_IGNORES}
            if now != then:
                changed = sorted(k for k in now if now[k] != then.get(k))
                raise UserError(f"the interrupted run in {work} used other settings ({', '.join(changed)}); "
                                "resume with the same ones or start again")
            student.load_state_dict(saved["model"])
            if inter.projections is not None:
                inter.projections.load_state_dict(saved["projections"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            torch.set_rng_state(saved["torch_rng"])
            state = saved["state"] | {"resumed_from_step": saved["state"]["step"]}
            reporter.log(f"resuming at step {state['step']} of {total}")

        def checkpoint():
            _save_checkpoint(work / "checkpoint.pt", {
                "model": student.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "projections": inter.projections.state_dict() if inter.projections is not None else None,
                "torch_rng": torch.get_rng_state(), "state": state, "config": asdict(cfg)})

        if state["step"] == 0:
            state["initial_eval"] = _evaluate(student, eval_b, teacher_eval, task)
            inter.drop_captures()
        student.train()
        t0 = time.perf_counter()
        with reporter.step(f"distill {total} steps ({cfg.epochs} epochs x {steps_per_epoch})"):
            while state["step"] < total:
                epoch, pos = divmod(state["step"], steps_per_epoch)
                order = list(range(steps_per_epoch))
                random.Random(cfg.seed * 1000 + epoch).shuffle(order)  # same order on resume
                for bi in order[pos:]:
                    b = train_b[bi]
                    out = student(**b["inputs"], **inter.student_kwargs())
                    parts = _loss(out, teacher_train[bi], b, task, cfg)
                    if inter.active:
                        parts |= inter.parts(out, b["inputs"])
                    loss = sum(parts.values())
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(list(student.parameters()) + inter.parameters(), 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad()
                    state["step"] += 1
                    state["history"].append(round(float(loss.detach()), 6))
                    for k, v in parts.items():
                        state["parts"].setdefault(k, []).append(round(float(v.detach()), 6))
                    if state["step"] % cfg.checkpoint_every == 0:
                        checkpoint()
                    if on_step:
                        on_step(state["step"], float(loss))
                ev_metrics = _evaluate(student, eval_b, teacher_eval, task)
                inter.drop_captures()
                state.setdefault("evals", []).append({"epoch": epoch + 1, **ev_metrics})
                reporter.log(f"epoch {epoch + 1}: loss {np.mean(state['history'][-steps_per_epoch:]):.4f}, "
                             + ", ".join(f"{k} {v:.4f}" for k, v in ev_metrics.items() if k != "score"))
                if ev_metrics["score"] > state["best"]:
                    state["best"] = ev_metrics["score"]
                    student.save_pretrained(work / "best", safe_serialization=True)
                checkpoint()
        train_seconds = time.perf_counter() - t0
    finally:
        inter.close()

    best = type(student).from_pretrained(work / "best").eval()
    final = _evaluate(best, eval_b, teacher_eval, task)
    best.eval()
    h = state["history"]
    report = {
        "task": task,
        "layer_map": layer_map,
        "intermediate": {"alpha_hidden": cfg.alpha_hidden, "alpha_attention": cfg.alpha_attention,
                         "projection": inter.projections is not None, "relation_heads": inter.heads,
                         "attention_layers": {"student": n_student - 1, "teacher": layer_map[-1]} if inter.attention else None},
        "data": {"texts": len(texts), "labelled": labels is not None, "train_texts": data["originals"],
                 "eval_texts": len(eval_idx), "augmented": data["augmented"],
                 "augment_per_text": cfg.augment if data["augmented"] else 0,
                 "teacher_labelled_rows": data["originals"] + data["augmented"]},
        "steps": state["step"], "resumed_from_step": state.get("resumed_from_step"),
        "loss_first_10pct": _means(h)["first_10pct"], "loss_last_10pct": _means(h)["last_10pct"],
        "loss_parts": {k: _means(v) for k, v in state["parts"].items()},
        "initial_eval": state.get("initial_eval"), "evals": state.get("evals", []), "final_eval": final,
        "train_seconds": train_seconds,
    }
    return best, report


# ------------------------------------------------------------------ distill (the command)

def _check_config(cfg: DistillConfig) -> None:
    if cfg.batch_size < 1 or cfg.epochs < 1:
        raise UserError("batch_size and epochs must be >= 1")
    if cfg.batch_size * cfg.max_length > cfg.max_tokens_per_batch:
        raise UserError(f"batch_size x max_length = {cfg.batch_size * cfg.max_length} tokens per batch risks running out of "
                        f"memory (limit {cfg.max_tokens_per_batch}); lower --batch-size or raise the limit deliberately")
    if cfg.augment < 0 or cfg.augment_below < 0:
        raise UserError("augment and augment_below must be >= 0")
    if min(cfg.alpha_hidden, cfg.alpha_attention, cfg.alpha_kd, cfg.alpha_ce, cfg.alpha_cos, cfg.alpha_mse) < 0:
        raise UserError("loss weights (alpha_*) must be >= 0")
    if cfg.relation_heads is not None and cfg.relation_heads < 1:
        raise UserError("relation_heads must be >= 1")
    if cfg.layers is None and cfg.keep_layers is None and cfg.student is None and cfg.shape is None:
        raise UserError("say how small: --layers N, --keep-layers i,j,..., --shape L3-H256-F1024 or --student PATH")
    if cfg.shape and cfg.student:
        raise UserError("--shape builds the student from the teacher; it does not go with --student")


def _check_layers(cfg: DistillConfig, ckpt):
    """The student's shape (bertexport.students.shapes) or layer choice, checked from the config
    before the teacher loads. Returns the StudentShape or None."""
    fam = get_family(ckpt.family)
    n_layers = int(fam.config_value(ckpt.config, fam.layers_key, 0))
    shape = None
    if cfg.shape:

        teacher = students.teacher_shape(ckpt.config)
        shape = students.parse_shape(cfg.shape, teacher)
        students.check_shape(shape, teacher, ckpt.family, ckpt.config)
        if ckpt.task == "feature-extraction" and shape.hidden != teacher.hidden:
            raise UserError(f"--shape {cfg.shape}: an embedding model's hidden size is its output size; a student of "
                            f"another width would give {shape.hidden}-dimensional vectors instead of {teacher.hidden}. "
                            "Keep H (e.g. L3 or L3-F768)")
        if cfg.layers is not None and cfg.layers != shape.layers:
            raise UserError(f"--layers {cfg.layers} contradicts --shape {cfg.shape} ({shape.layers} layers)")
        if cfg.keep_layers and len(cfg.keep_layers) != shape.layers:
            raise UserError(f"--keep-layers gives {len(cfg.keep_layers)} layers, --shape {cfg.shape} has {shape.layers}")
    if cfg.student:
        return None
    if cfg.keep_layers:
        keep = list(cfg.keep_layers)
        if sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= n_layers:
            raise UserError(f"keep_layers must be increasing indices in 0..{n_layers - 1}, got {keep}")
        if len(keep) >= n_layers and shape is None:
            raise UserError(f"a student with {len(keep)} layers is not smaller than the teacher ({n_layers})")
    elif shape is None:
        keep_every(n_layers, cfg.layers)
    return shape


def _shaped_student(teacher_model, tok, shape, texts, labels, task, cfg: DistillConfig, work: Path, reporter):
    """A student of ``shape`` sliced from the teacher: layers chosen by measured effect
    (``students.choose_layers``) unless given, heads/FFN/hidden by Taylor importance, both
    measured on (up to 512 of) the training texts against the teacher's outputs."""

    n = _layer_count(teacher_model.config)
    teacher = students.teacher_shape(teacher_model.config)
    train_idx, _ = split_eval(len(texts), cfg)
    sample = train_idx[:512]
    batches = _length_batches(tok, [texts[i] for i in sample], None, cfg.batch_size, cfg.max_length, cfg.seed)
    work.mkdir(parents=True, exist_ok=True)
    outs = _Outputs(work / "teacher-shape.npz").load_or_compute(teacher_model, batches, task, reporter.log)
    info = {"shape": shape.to_dict(), "teacher_shape": teacher.to_dict()}
    if cfg.keep_layers:
        keep = list(cfg.keep_layers)
    elif shape.layers == n:
        keep = list(range(n))
    else:
        with reporter.step(f"choose {shape.layers} of {n} teacher layers"):
            keep, table = students.choose_layers(teacher_model, shape.layers, batches, task, outs)
        info["layer_choice"] = table
    importance = None
    if (shape.hidden, shape.ffn) != (teacher.hidden, teacher.ffn):
        # scored on the layer-dropped copy: the scores then see the layers the student keeps
        # (measured on a tiny trained model: far better than scoring the full teacher)
        scored = teacher_model if len(keep) == n else shrink(teacher_model, keep)
        with reporter.step("importance of heads, FFN neurons and hidden dimensions"):
            importance = students.score_importance(scored, batches, task, outs)
    student = students.make_student(teacher_model, shape, keep, importance)
    (work / "teacher-shape.npz").unlink(missing_ok=True)
    return student, keep, info


def distill(teacher: str, out: str | Path, *, task: str | None = None, data: str | Path | None = None,
            config: DistillConfig | None = None, resume: bool = False, force: bool = False,
            reporter: Reporter | None = None, on_step: Callable[[int, float], None] | None = None) -> DistillResult:
    from bertexport.core.textdata import TextSet, builtin_calibration, load_texts

    cfg = config or DistillConfig()
    reporter = reporter or Reporter()
    out = Path(out).expanduser().resolve()
    work = out.parent / f".{out.name}.distill"
    ckpt = resolve_checkpoint(teacher, task)
    if not resume:
        check_destination(out, force, [ckpt.path], "student folder")
        if work.exists():
            shutil.rmtree(work)
    elif not (work / "checkpoint.pt").is_file():
        raise UserError(f"nothing to resume: no checkpoint in {work}")
    _check_config(cfg)
    ts = load_texts(data) if data else TextSet(builtin_calibration(), source="builtin:calib")
    if len(ts.texts) < 16:
        raise UserError(f"{len(ts.texts)} texts are too few to distill on (need >= 16)")
    shape = _check_layers(cfg, ckpt)  # before the teacher loads
    labels = None
    if ts.labels is not None and ckpt.task == "text-classification":
        from bertexport.core.textdata import label_ids

        labels = list(label_ids(ts.labels, ckpt.id2label))
    shape_info = None
    with reporter.step(f"load teacher {ckpt.family} ({ckpt.task})"):
        teacher_model = load_model(ckpt)
        tok = load_tokenizer(ckpt)
        teacher_layers = _layer_count(teacher_model.config)
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.student:
        sckpt = resolve_checkpoint(cfg.student, ckpt.task)
        if sckpt.family != ckpt.family:
            raise UserError(f"student family {sckpt.family} differs from the teacher's ({ckpt.family})")
        _check_tokenizers_match(tok, load_tokenizer(sckpt), ts.texts)
        student = load_model(sckpt)
        keep = None
    elif shape is not None:
        with reporter.step(f"build student {shape.name}"):
            student, keep, shape_info = _shaped_student(teacher_model, tok, shape, ts.texts, labels, ckpt.task, cfg,
                                                        work, reporter)
    else:
        keep = cfg.keep_layers or keep_every(teacher_layers, cfg.layers)
        student = shrink(teacher_model, keep)
    layer_map = default_layer_map(teacher_layers, keep, _layer_count(student.config))
    best, trained = train_student(teacher_model, student, tok, ts.texts, labels, ckpt.task, cfg, work, reporter,
                                  layer_map, on_step=on_step)
    _, eval_idx = split_eval(len(ts.texts), cfg)  # the held-out texts train_student evaluated on (outputs cached in work)
    eval_b = _length_batches(tok, [ts.texts[i] for i in eval_idx], [labels[i] for i in eval_idx] if labels is not None else None,
                             cfg.batch_size, cfg.max_length, cfg.seed)
    teacher_eval = _Outputs(work / "teacher-eval.npz").load_or_compute(teacher_model, eval_b, ckpt.task, reporter.log)
    report = _report(ckpt, teacher_model, best, keep, teacher_layers, trained, eval_b, teacher_eval, cfg, ts, shape_info)
    with StagedFolder(out, force=force or resume, protect=[ckpt.path], what="student folder") as staged:
        best.save_pretrained(staged.staging, safe_serialization=True)
        tok.save_pretrained(staged.staging)
        (staged.staging / "distill_report.json").write_text(json.dumps(report, indent=2) + "\n")
        staged.publish(True)
    shutil.rmtree(work, ignore_errors=True)
    return DistillResult(out, report)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def latency_feeds(eval_b, texts, max_length):
    """One sequence of ``max_length`` real tokens (texts joined): a fixed, comparable cell
    (b1/s128 by default) instead of whatever the first eval batch happens to be."""
    import torch

    ids = eval_b[0]["inputs"]
    tok_ids = torch.cat([b["inputs"]["input_ids"][0] for b in eval_b])[:max_length].unsqueeze(0)
    out = {"input_ids": tok_ids, "attention_mask": torch.ones_like(tok_ids)}
    if "token_type_ids" in ids:
        out["token_type_ids"] = torch.zeros_like(tok_ids)
    return out


def _report(ckpt, teacher, student, keep, teacher_layers, trained: dict, eval_b, teacher_eval, cfg, ts, shape_info) -> dict:
    import torch

    from bertexport.judging.latency import speedup, time_interleaved

    teacher_eval_metrics = {}
    if ckpt.task == "text-classification" and any("labels" in b for b in eval_b):
        correct = sum(int((torch.from_numpy(t["logits"]).argmax(-1) == b["labels"]).sum()) for b, t in zip(eval_b, teacher_eval))
        teacher_eval_metrics["accuracy"] = correct / sum(len(b["labels"]) for b in eval_b)
    feeds = latency_feeds(eval_b, ts.texts, cfg.max_length)
    with torch.inference_mode():
        timed = time_interleaved({"teacher": lambda: teacher(**feeds), "student": lambda: student(**feeds)}, runs=20, warmup=3)
    student_info = {"layers": _layer_count(student.config), "kept_teacher_layers": keep, "parameters": _params(student),
                    "bytes_fp32": _params(student) * 4}
    if shape_info:
        student_info |= shape_info
    return {
        "teacher": {"source": ckpt.source, "sha256": ckpt.sha256, "layers": teacher_layers, "parameters": _params(teacher),
                    "bytes_fp32": _params(teacher) * 4, **teacher_eval_metrics},
        "student": student_info,
        "config": asdict(cfg),
        **trained,
        "data": {"source": ts.source, **trained["data"]},
        "latency": {"threads": cfg.threads, "batch": int(feeds["input_ids"].shape[0]), "sequence": int(feeds["input_ids"].shape[1]),
                    "teacher_p50_ms": timed["teacher"].p50 * 1e3, "student_p50_ms": timed["student"].p50 * 1e3,
                    "speedup": speedup(timed["teacher"], timed["student"])},
    }


def cached_student(model: str, task: str | None, layers: int, data=None, epochs: int = 3,
                   reporter: Reporter | None = None) -> Path:
    """An N-layer student of ``model``, distilled once and cached by teacher hash, layer
    count, data and the whole distillation config (``convert --distill N`` compiles it)."""
    from bertexport.core.cache import cache_dir
    from bertexport.core.hashing import cache_key, sha256_file

    ckpt = resolve_checkpoint(model, task)
    cfg = DistillConfig(layers=layers, epochs=epochs)
    data_digest = sha256_file(data) if data else "builtin"
    key = cache_key(ckpt.sha256, ckpt.task, layers, data_digest, asdict(cfg))
    out = cache_dir("students") / key
    if (out / "distill_report.json").is_file():
        (reporter or Reporter()).log(f"reusing distilled student {out}")
        return out
    distill(model, out, task=ckpt.task, data=data, config=cfg, force=True, reporter=reporter)
    return out
