"""``distill``: a smaller student from any BERT-family teacher (same family and tokenizer).

The student keeps every k-th teacher layer (or an explicit list), DistilBERT-style, or is
a checkpoint the user gives. Training uses torch and the transformers model classes:
temperature-scaled KL on the teacher's logits for heads, cosine + MSE on hidden states
and pooled embeddings for encoders, plus cross-entropy on labels when the data has them.
The teacher's outputs are computed once and cached; batches are bucketed by length; each
epoch is evaluated on a held-out slice and the best student is kept; a checkpoint
(model, optimizer, schedule, RNG, position) is written atomically so an interrupted run
resumes with ``resume=True``. Nothing is published to ``out`` until training ends.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bertexport.staging import StagedFolder, check_destination
from bertexport.checkpoint import load_model, load_tokenizer, resolve_checkpoint
from bertexport.errors import UserError
from bertexport.families import get_family
from bertexport.progress import Reporter



@dataclass
class DistillConfig:
    layers: int | None = None  # student layer count (every k-th teacher layer, last one kept)
    keep_layers: list[int] | None = None  # or explicit teacher layer indices
    student: str | None = None  # or a student checkpoint sharing the tokenizer
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    temperature: float = 2.0
    alpha_kd: float = 1.0  # KL on logits (heads)
    alpha_ce: float = 0.5  # cross-entropy on labels (when the data has them)
    alpha_cos: float = 1.0  # 1 - cosine of pooled embeddings (encoders)
    alpha_mse: float = 1.0  # MSE of last hidden states (encoders)
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


def keep_every(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, always including the last (DistilBERT keeps every 2nd)."""
    if not 1 <= student_layers < teacher_layers:
        raise UserError(f"student layers must be between 1 and {teacher_layers - 1} (teacher has {teacher_layers}), got {student_layers}")
    step = teacher_layers / student_layers
    return [int(round((i + 1) * step)) - 1 for i in range(student_layers)]


def _layer_count(config) -> int:
    for k in get_family(config.model_type).layers_key:
        if hasattr(config, k):
            return int(getattr(config, k))
    raise UserError(f"cannot find the layer count of {type(config).__name__}")


def shrink(teacher, keep: list[int]):
    """A student with the teacher's kept layers (and everything else) copied over."""
    import copy

    n = _layer_count(teacher.config)
    if sorted(set(keep)) != list(keep) or not keep or keep[0] < 0 or keep[-1] >= n:
        raise UserError(f"keep_layers must be increasing indices in 0..{n - 1}, got {keep}")
    if len(keep) >= n:
        raise UserError(f"a student with {len(keep)} layers is not smaller than the teacher ({n})")
    fam = get_family(teacher.config.model_type)
    cfg = copy.deepcopy(teacher.config)
    for k in fam.layers_key:
        if hasattr(cfg, k):
            setattr(cfg, k, len(keep))
    layer_key = re.compile(fam.layer_key)
    student = type(teacher)(cfg)
    remap = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = layer_key.match(key)
        if m and not fam.shared_layers:  # ALBERT shares one layer group: only the count changes
            old = int(m.group(2))
            if old not in remap:
                continue
            key = f"{m.group(1)}{remap[old]}{m.group(3)}"
        state[key] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UserError(f"could not map teacher weights onto the student: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return student


def _check_tokenizers_match(a, b, texts: list[str]) -> None:
    if a.get_vocab() != b.get_vocab() or [a(t)["input_ids"] for t in texts[:20]] != [b(t)["input_ids"] for t in texts[:20]]:
        raise UserError("the student's tokenizer differs from the teacher's; distillation needs the same tokenizer")


class _Outputs:
    """Teacher outputs for every text, computed once, kept in memory and on disk."""

    def __init__(self, path: Path):
        self.path = path

    def load_or_compute(self, teacher, batches, task: str, log) -> list[dict]:
        import torch

        if self.path.is_file():
            data = np.load(self.path, allow_pickle=False)
            return [{k[len(f"{i}:"):]: data[k] for k in data.files if k.startswith(f"{i}:")} for i in range(len(batches))]
        out = []
        with torch.inference_mode():
            for i, b in enumerate(batches):
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
        log(f"teacher outputs cached for {len(batches)} batches")
        return out


def _length_batches(tokenizer, texts, labels, batch_size, max_length, seed):
    """Batches of similar length (less padding), in a fixed order."""
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        b = {"inputs": dict(enc), "index": idx}
        if labels is not None:
            b["labels"] = torch.tensor([labels[i] for i in idx])
        batches.append(b)
    return batches


def _loss(student_out, teacher: dict, batch, task, cfg: DistillConfig):
    import torch
    import torch.nn.functional as F

    mask = batch["inputs"]["attention_mask"].float()
    parts = {}
    if task == "feature-extraction":
        hs, ht = student_out.last_hidden_state, torch.from_numpy(teacher["hidden"])
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
            t = torch.from_numpy(t)
            kl = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="none").sum(-1) * T * T
            if kl.dim() == 2 and task != "question-answering":  # token-level: only real tokens
                kl = (kl * mask).sum() / mask.sum()
            kd = kd + kl.mean()
        parts["kd"] = cfg.alpha_kd * kd
        if "labels" in batch and task == "text-classification":
            parts["ce"] = cfg.alpha_ce * F.cross_entropy(student_out.logits, batch["labels"])
    return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}


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


def distill(teacher: str, out: str | Path, *, task: str | None = None, data: str | Path | None = None,
            config: DistillConfig | None = None, resume: bool = False, force: bool = False,
            reporter: Reporter | None = None, on_step: Callable[[int, float], None] | None = None) -> DistillResult:
    import torch
    from transformers import get_linear_schedule_with_warmup

    from bertexport.textdata import TextSet, builtin_calibration, load_texts

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
    if cfg.batch_size < 1 or cfg.epochs < 1:
        raise UserError("batch_size and epochs must be >= 1")
    if cfg.batch_size * cfg.max_length > cfg.max_tokens_per_batch:
        raise UserError(f"batch_size x max_length = {cfg.batch_size * cfg.max_length} tokens per batch risks running out of "
                        f"memory (limit {cfg.max_tokens_per_batch}); lower --batch-size or raise the limit deliberately")
    if cfg.layers is None and cfg.keep_layers is None and cfg.student is None:
        raise UserError("say how small: --layers N, --keep-layers i,j,... or --student PATH")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    ts = load_texts(data) if data else TextSet(builtin_calibration(), source="builtin:calib")
    if len(ts.texts) < 16:
        raise UserError(f"{len(ts.texts)} texts are too few to distill on (need >= 16)")
    if not cfg.student:  # the layer choice is checked from the config, before the teacher loads
        fam = get_family(ckpt.family)
        n_layers = int(fam.config_value(ckpt.config, fam.layers_key, 0))
        if cfg.keep_layers:
            keep = list(cfg.keep_layers)
            if sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= n_layers:
                raise UserError(f"keep_layers must be increasing indices in 0..{n_layers - 1}, got {keep}")
            if len(keep) >= n_layers:
                raise UserError(f"a student with {len(keep)} layers is not smaller than the teacher ({n_layers})")
        else:
            keep_every(n_layers, cfg.layers)
    with reporter.step(f"load teacher {ckpt.family} ({ckpt.task})"):
        teacher_model = load_model(ckpt)
        tok = load_tokenizer(ckpt)
        teacher_layers = _layer_count(teacher_model.config)
        if cfg.student:
            sckpt = resolve_checkpoint(cfg.student, ckpt.task)
            if sckpt.family != ckpt.family:
                raise UserError(f"student family {sckpt.family} differs from the teacher's ({ckpt.family})")
            _check_tokenizers_match(tok, load_tokenizer(sckpt), ts.texts)
            student = load_model(sckpt)
            keep = None
        else:
            keep = cfg.keep_layers or keep_every(teacher_layers, cfg.layers)
            student = shrink(teacher_model, keep)
    labels = None
    if ts.labels is not None and ckpt.task == "text-classification":
        from bertexport.textdata import label_ids

        labels = list(label_ids(ts.labels, ckpt.id2label))

    rng = random.Random(cfg.seed)
    idx = list(range(len(ts.texts)))
    rng.shuffle(idx)
    n_eval = max(8, int(len(idx) * cfg.eval_fraction))
    ev, tr = idx[:n_eval], idx[n_eval:]
    pick = lambda ids, xs: [xs[i] for i in ids] if xs is not None else None  # noqa: E731
    train_b = _length_batches(tok, pick(tr, ts.texts), pick(tr, labels), cfg.batch_size, cfg.max_length, cfg.seed)
    eval_b = _length_batches(tok, pick(ev, ts.texts), pick(ev, labels), cfg.batch_size, cfg.max_length, cfg.seed)
    work.mkdir(parents=True, exist_ok=True)
    with reporter.step("teacher outputs (computed once, cached)"):
        teacher_train = _Outputs(work / "teacher-train.npz").load_or_compute(teacher_model, train_b, ckpt.task, reporter.log)
        teacher_eval = _Outputs(work / "teacher-eval.npz").load_or_compute(teacher_model, eval_b, ckpt.task, reporter.log)

    steps_per_epoch = len(train_b)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * total), total)
    state = {"step": 0, "best": -math.inf, "history": [], "resumed_from_step": None}
    if resume:
        saved = torch.load(work / "checkpoint.pt", weights_only=False)
        student.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"] | {"resumed_from_step": saved["state"]["step"]}
        reporter.log(f"resuming at step {state['step']} of {total}")

    def checkpoint():
        _save_checkpoint(work / "checkpoint.pt", {"model": student.state_dict(), "optimizer": opt.state_dict(),
                                                 "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                                                 "state": state, "config": asdict(cfg)})

    before = _evaluate(student, eval_b, teacher_eval, ckpt.task) if state["step"] == 0 else None
    if before:
        state["initial_eval"] = before
    student.train()
    t0 = time.perf_counter()
    with reporter.step(f"distill {total} steps ({cfg.epochs} epochs x {steps_per_epoch})"):
        while state["step"] < total:
            epoch, pos = divmod(state["step"], steps_per_epoch)
            order = list(range(steps_per_epoch))
            random.Random(cfg.seed * 1000 + epoch).shuffle(order)  # same order on resume
            for bi in order[pos:]:
                b = batches_b = train_b[bi]
                loss, parts = _loss(student(**batches_b["inputs"]), teacher_train[bi], b, ckpt.task, cfg)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
                state["step"] += 1
                state["history"].append(round(float(loss.detach()), 6))
                if state["step"] % cfg.checkpoint_every == 0:
                    checkpoint()
                if on_step:
                    on_step(state["step"], float(loss))
            ev_metrics = _evaluate(student, eval_b, teacher_eval, ckpt.task)
            state.setdefault("evals", []).append({"epoch": epoch + 1, **ev_metrics})
            reporter.log(f"epoch {epoch + 1}: loss {np.mean(state['history'][-steps_per_epoch:]):.4f}, "
                         + ", ".join(f"{k} {v:.4f}" for k, v in ev_metrics.items() if k != "score"))
            if ev_metrics["score"] > state["best"]:
                state["best"] = ev_metrics["score"]
                student.save_pretrained(work / "best", safe_serialization=True)
            checkpoint()
    train_seconds = time.perf_counter() - t0

    best = type(student).from_pretrained(work / "best").eval()
    report = _report(ckpt, teacher_model, best, keep, teacher_layers, state, eval_b, teacher_eval, cfg, ts, train_seconds)
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


def _report(ckpt, teacher, student, keep, teacher_layers, state, eval_b, teacher_eval, cfg, ts, seconds) -> dict:
    import torch

    from bertexport.latency import speedup, time_interleaved

    final = _evaluate(student, eval_b, teacher_eval, ckpt.task)
    teacher_eval_metrics = {}
    if ckpt.task == "text-classification" and any("labels" in b for b in eval_b):
        correct = sum(int((torch.from_numpy(t["logits"]).argmax(-1) == b["labels"]).sum()) for b, t in zip(eval_b, teacher_eval))
        teacher_eval_metrics["accuracy"] = correct / sum(len(b["labels"]) for b in eval_b)
    feeds = latency_feeds(eval_b, ts.texts, cfg.max_length)
    with torch.inference_mode():
        timed = time_interleaved({"teacher": lambda: teacher(**feeds), "student": lambda: student(**feeds)}, runs=20, warmup=3)
    h = state["history"]
    k = max(1, len(h) // 10)
    return {
        "teacher": {"source": ckpt.source, "sha256": ckpt.sha256, "layers": teacher_layers, "parameters": _params(teacher),
                    "bytes_fp32": _params(teacher) * 4, **teacher_eval_metrics},
        "student": {"layers": _layer_count(student.config), "kept_teacher_layers": keep, "parameters": _params(student),
                    "bytes_fp32": _params(student) * 4},
        "task": ckpt.task,
        "data": {"source": ts.source, "texts": len(ts.texts), "labelled": ts.labels is not None, "eval_texts": sum(len(b["index"]) for b in eval_b)},
        "config": asdict(cfg),
        "steps": state["step"], "resumed_from_step": state.get("resumed_from_step"),
        "loss_first_10pct": float(np.mean(h[:k])), "loss_last_10pct": float(np.mean(h[-k:])),
        "initial_eval": state.get("initial_eval"), "evals": state.get("evals", []), "final_eval": final,
        "train_seconds": seconds,
        "latency": {"threads": cfg.threads, "batch": int(feeds["input_ids"].shape[0]), "sequence": int(feeds["input_ids"].shape[1]),
                    "teacher_p50_ms": timed["teacher"].p50 * 1e3, "student_p50_ms": timed["student"].p50 * 1e3,
                    "speedup": speedup(timed["teacher"], timed["student"])},
    }


def cached_student(model: str, task: str | None, layers: int, data=None, epochs: int = 3,
                   reporter: Reporter | None = None) -> Path:
    """An N-layer student of ``model``, distilled once and cached by teacher hash, layer
    count, data and epochs (``convert --distill N`` compiles it)."""
    import hashlib

    from bertexport.cache import cache_dir
    from bertexport.hashing import sha256_file

    ckpt = resolve_checkpoint(model, task)
    data_digest = sha256_file(data) if data else "builtin"
    key = hashlib.sha256(json.dumps([ckpt.sha256, ckpt.task, layers, data_digest, epochs]).encode()).hexdigest()[:16]
    out = cache_dir("students") / key
    if (out / "distill_report.json").is_file():
        (reporter or Reporter()).log(f"reusing distilled student {out}")
        return out
    distill(model, out, task=ckpt.task, data=data, config=DistillConfig(layers=layers, epochs=epochs),
            force=True, reporter=reporter)
    return out
