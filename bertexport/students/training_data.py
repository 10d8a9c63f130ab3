"""The rows a student trains and is judged on: the seeded held-out split, teacher-labelled
variants of small data (``bertexport.students.augment``), the sequence length training pads
to, batches bucketed by length, and the teacher's outputs for them (computed once, cached)."""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np

from bertexport.students.distill_config import DistillConfig


def split_eval(n: int, cfg: DistillConfig) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of ``n`` texts: a seeded shuffle, ``eval_fraction`` (>= 8) held out."""
    idx = list(range(n))
    random.Random(cfg.seed).shuffle(idx)
    n_eval = max(8, int(n * cfg.eval_fraction))
    return idx[n_eval:], idx[:n_eval]


def training_rows(texts, labels, train_idx, eval_idx, cfg: DistillConfig) -> dict:
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


def token_lengths(tokenizer, texts: list[str], model_config) -> list[int]:
    """Each text's token count (special tokens included), cut at what the model accepts."""
    from bertexport.building.checkpoint import model_max_length

    cap = model_max_length(model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config), tokenizer)
    return [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=cap)["input_ids"]]


def sequence_length(tokenizer, texts: list[str], cfg: DistillConfig, model_config, lengths: list[int] | None = None) -> int:
    """The longest sequence training pads to: ``cfg.max_length`` when given, else the data's
    ``cfg.length_percentile`` token length (special tokens included), never above what the
    model accepts (``checkpoint.model_max_length``). Short texts need no 128-token batches:
    the cost of a step grows with the padded length, and the bucketed batches only pad to
    their longest row, which this cuts at the tail of the distribution. ``lengths``: the
    texts' ``token_lengths`` when the caller has them."""
    from bertexport.building.checkpoint import model_max_length

    cap = model_max_length(model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config), tokenizer)
    if cfg.max_length is not None:
        return min(int(cfg.max_length), cap)
    lengths = lengths if lengths is not None else token_lengths(tokenizer, texts, model_config)
    return max(8, min(cap, int(math.ceil(np.percentile(lengths, cfg.length_percentile)))))


def length_batches(tokenizer, texts, labels, batch_size, max_length, seed):
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


class TeacherOutputs:
    """Teacher outputs (logits, or last hidden states for encoders) for every batch,
    computed once, kept in memory and on disk (``{batch}:{name}`` arrays of one .npz). The
    pass that caches the teacher's intermediate states hands its forwards' outputs to
    ``save`` (``losses._Intermediate.cache_teacher``): one teacher pass, not two."""

    def __init__(self, path: Path, task: str):
        self.path, self.task = path, task

    def item(self, o) -> dict:
        """What is kept of one batch's teacher output ``o``."""
        if self.task == "feature-extraction":
            return {"hidden": o.last_hidden_state.cpu().numpy()}
        if self.task == "question-answering":
            return {"start": o.start_logits.cpu().numpy(), "end": o.end_logits.cpu().numpy()}
        return {"logits": o.logits.cpu().numpy()}

    def save(self, out: list[dict]) -> None:
        """Write every batch's items (renamed into place: an interrupted write leaves no file)."""
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, **{f"{i}:{k}": v for i, item in enumerate(out) for k, v in item.items()})
        os.replace(tmp, self.path)

    def load_or_compute(self, teacher, batches, log) -> list[dict]:
        import torch

        if self.path.is_file():
            data = np.load(self.path, allow_pickle=False)
            out = [{k[len(f"{i}:"):]: data[k] for k in data.files if k.startswith(f"{i}:")} for i in range(len(batches))]
            log(f"teacher outputs loaded from {self.path.name} ({len(batches)} batches)")
            return out
        with torch.inference_mode():
            out = [self.item(teacher(**b["inputs"])) for b in batches]
        self.save(out)
        log(f"teacher outputs computed for {sum(len(b['index']) for b in batches)} texts, cached in {self.path.name}")
        return out
