"""Students from a pre-trained smaller checkpoint (``--student-init``): a general-distilled
MiniLM-L3, a BERT miniature, ... that shares the teacher's vocabulary, distilled with the
same losses as the students sliced from the teacher (``training.train_student``; learned
projections where the hidden widths differ).

``check_student_init`` refuses, before any model weights load (config.json and tokenizer
files only; then ``resolve_checkpoint``'s checks of the weight files, which reads headers
and hashes, never builds a model):
- a path that is not a transformers checkpoint folder of a supported family;
- another vocabulary: the two tokenizers' token -> id maps, special-token ids and the ids
  of sample texts are compared, and the message names what differs (sizes, missing or
  moved tokens with examples, or a text that tokenizes differently). A model of another
  family passes when its tokenizer is the teacher's (e.g. a DistilBERT student of a BERT
  teacher): the two then get the inputs both take;
- a checkpoint fine-tuned for another downstream task (its body was tuned for that task;
  a general one, with no head or a pre-training head, is what to give);
- a student that is not smaller: its linear-layer MACs per token
  (layers x (4 hidden^2 + 2 hidden x FFN)) must be below the teacher's (refused, not
  warned: distilling into a model as large as the teacher gains no speed);
- fewer positions than the training length, or (embedding models) another hidden size,
  which is an embedding model's output size.

``load_init_student`` then loads it with the teacher's task head: the checkpoint's own head
when it is the same task with the same labels, else a fresh one (no head, a pre-training
head, or other labels).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from bertexport.core.errors import UserError
from bertexport.core.families import FAMILIES, supported_families_text
from bertexport.students.shapes import StudentShape, teacher_shape

_LABELLED = ("text-classification", "token-classification")
_SPECIALS = ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token", "bos_token", "eos_token")


@dataclass(frozen=True)
class InitStudent:
    """A checked ``--student-init`` checkpoint (no weights loaded)."""

    source: str
    path: Path
    family: str
    config: dict
    shape: StudentShape
    detected_task: str | None
    head: str  # "kept", or "fresh: <why>"
    input_names: tuple[str, ...]  # tokenizer outputs both the teacher and the student take
    vocabulary: dict  # {"size", "sha256"}: the shared vocabulary
    sha256: str  # of the checkpoint's config and weights

    @property
    def name(self) -> str:
        """How a search names it: what it is, e.g. ``init:minilm-l3 L3-H384``."""
        return f"init:{self.path.name} L{self.shape.layers}-H{self.shape.hidden}"

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "path": str(self.path), "family": self.family,
                "shape": self.shape.to_dict(), "detected_task": self.detected_task, "head": self.head,
                "input_names": list(self.input_names), "vocabulary": self.vocabulary, "sha256": self.sha256}


def _refuse(source: str, why: str):
    raise UserError(f"--student-init {source}: {why}")


def _config(source: str) -> tuple[Path, dict]:
    path = Path(source).expanduser()
    if not path.exists():
        _refuse(source, "not found (give a local checkpoint folder)")
    if not path.is_dir():
        _refuse(source, "not a folder (give a transformers checkpoint folder: config.json, weights, tokenizer)")
    if not (path / "config.json").is_file():
        _refuse(source, "has no config.json: not a transformers checkpoint folder")
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _refuse(source, f"config.json is not valid JSON: {e}")
    if not isinstance(config, dict) or config.get("model_type") not in FAMILIES:
        _refuse(source, f"model_type {config.get('model_type') if isinstance(config, dict) else None!r} is not a "
                        f"supported BERT-family model ({supported_families_text()})")
    return path.resolve(), config


def _tokenizer(path: Path, source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as e:
        _refuse(source, f"its tokenizer could not be loaded ({type(e).__name__}: {str(e)[:200]}); the student must ship "
                        "the teacher's tokenizer files")


def vocabulary_digest(tokenizer) -> dict:
    """The vocabulary's size and a sha256 of its token -> id map."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return {"size": len(vocab), "sha256": hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()}


def _examples(tokens, vocab) -> str:
    return ", ".join(repr(t) for t in sorted(tokens, key=lambda t: vocab[t])[:3])


def vocabulary_difference(teacher_tok, student_tok, texts: list[str]) -> str | None:
    """What differs between the two tokenizers (None: the same): the token -> id maps, the
    special tokens' ids, then the ids of ``texts`` (normalisation, e.g. lower-casing)."""
    a, b = teacher_tok.get_vocab(), student_tok.get_vocab()
    if a != b:
        parts = []
        if len(a) != len(b):
            parts.append(f"{len(b)} tokens against the teacher's {len(a)}")
        missing = [t for t in a if t not in b]
        extra = [t for t in b if t not in a]
        moved = [t for t in a if t in b and a[t] != b[t]]
        if missing:
            parts.append(f"{len(missing)} of the teacher's tokens missing (e.g. {_examples(missing, a)})")
        if extra:
            parts.append(f"{len(extra)} tokens the teacher does not have (e.g. {_examples(extra, b)})")
        if moved:
            t = min(moved, key=lambda t: a[t])
            parts.append(f"{len(moved)} tokens with other ids (e.g. {t!r}: {a[t]} in the teacher's, {b[t]} in the student's)")
        return "; ".join(parts)
    for attr in _SPECIALS:
        ta, tb = getattr(teacher_tok, attr, None), getattr(student_tok, attr, None)
        if ta is not None and tb is not None and a.get(str(ta)) != b.get(str(tb)):
            return f"the same vocabulary but another {attr} ({tb!r}, id {b.get(str(tb))}; the teacher's {ta!r}, id {a.get(str(ta))})"
    for text in texts:
        ia, ib = teacher_tok(text)["input_ids"], student_tok(text)["input_ids"]
        if ia != ib:
            return (f"the same vocabulary, but {text[:60]!r} tokenizes differently (teacher {ia[:10]}, student {ib[:10]}): "
                    "another normalisation (lower-casing, accents) or special tokens")
    return None


def _macs(shape: StudentShape) -> int:
    """Linear-layer multiply-adds per token (Q, K, V, output: 4 h^2; the FFN: 2 h f)."""
    return shape.layers * (4 * shape.hidden * shape.hidden + 2 * shape.hidden * shape.ffn)


def _head(source: str, teacher_task: str, teacher_config: dict, detected: str | None, config: dict) -> str:
    if teacher_task == "feature-extraction":
        return "none: an embedding model has no task head" if detected in (None, "feature-extraction") else \
            f"dropped: the encoder of its {detected} model is kept"
    if detected in (None, "feature-extraction"):
        return "fresh: the checkpoint has no task head"
    if detected == "fill-mask" and teacher_task != "fill-mask":
        return "fresh: its pre-training (masked-LM) head is dropped"
    if detected != teacher_task:
        _refuse(source, f"task mismatch: it is fine-tuned for {detected}, the teacher for {teacher_task}; give a "
                        f"general pre-trained checkpoint (no task head, or a masked-LM one) or one fine-tuned for "
                        f"{teacher_task}")
    if teacher_task in _LABELLED:
        mine = {str(k): v for k, v in (config.get("id2label") or {}).items()}
        theirs = {str(k): v for k, v in (teacher_config.get("id2label") or {}).items()}
        if mine != theirs:
            return f"fresh: its head has other labels ({', '.join(list(mine.values())[:4])}; the teacher's " \
                   f"{', '.join(list(theirs.values())[:4])})"
    return "kept"


def check_student_init(source: str, teacher_ckpt, texts: list[str] = (), max_length: int | None = None,
                       teacher_tokenizer=None) -> InitStudent:
    """Check ``--student-init source`` against the teacher; see the module doc. Raises
    ``UserError`` (exit 2). Loads tokenizers and reads configs only."""
    from bertexport.building.checkpoint import load_tokenizer, resolve_checkpoint
    from bertexport.core.textdata import builtin_samples

    path, config = _config(source)
    if path == Path(teacher_ckpt.path).resolve():
        _refuse(source, "is the teacher itself")
    student_tok = _tokenizer(path, source)
    teacher_tok = teacher_tokenizer or load_tokenizer(teacher_ckpt)
    differs = vocabulary_difference(teacher_tok, student_tok, list(builtin_samples())[:20] + list(texts)[:50])
    if differs:
        _refuse(source, f"its vocabulary differs from the teacher's ({differs}); a student must share the teacher's "
                        "tokenizer")
    try:
        ckpt = resolve_checkpoint(str(path))
    except UserError as e:
        _refuse(source, str(e))
    teacher, student = teacher_shape(teacher_ckpt.config), teacher_shape(config)
    if _macs(student) >= _macs(teacher):
        _refuse(source, f"{student.name} is not smaller than the teacher {teacher.name} "
                        f"({_macs(student) / 1e6:.2f}M against {_macs(teacher) / 1e6:.2f}M linear multiply-adds per token)")
    if teacher_ckpt.task == "feature-extraction" and student.hidden != teacher.hidden:
        _refuse(source, f"an embedding model's hidden size is its output size: the student's {student.hidden} is not "
                        f"the teacher's {teacher.hidden}")
    positions = config.get("max_position_embeddings")
    needed = min(x for x in (max_length, teacher_ckpt.config.get("max_position_embeddings"), 512) if x is not None)
    if positions is not None and positions < needed:
        _refuse(source, f"it takes {positions} positions, fewer than the {needed} tokens it may be trained on")
    head = _head(source, teacher_ckpt.task, teacher_ckpt.config, ckpt.detected_task, config)
    names = tuple(n for n in teacher_tok.model_input_names if n in student_tok.model_input_names)
    return InitStudent(source=source, path=path, family=ckpt.family, config=config, shape=student,
                       detected_task=ckpt.detected_task, head=head, input_names=names,
                       vocabulary=vocabulary_digest(teacher_tok), sha256=ckpt.sha256)


def training_tokenizer(teacher_tok, init: InitStudent):
    """The teacher's tokenizer, giving only the inputs both models take (a student of
    another family may not take ``token_type_ids``)."""
    if tuple(teacher_tok.model_input_names) == init.input_names:
        return teacher_tok
    tok = copy.copy(teacher_tok)
    tok.model_input_names = list(init.input_names)
    return tok


def student_tokenizer(teacher_tok, teacher_family: str, init: InitStudent):
    """The tokenizer saved with the student: the teacher's, or (another family) the
    student's own, whose vocabulary was checked to be the teacher's."""
    return teacher_tok if init.family == teacher_family else _tokenizer(init.path, init.source)


def load_init_student(init: InitStudent, teacher_ckpt, teacher_model=None):
    """The student model: ``init``'s weights under the teacher's task head (see ``InitStudent.head``).
    A fresh head starts from the teacher's own head weights where ``teacher_model`` is given and
    the shapes agree (a head-less general checkpoint of the teacher's width: pooler and classifier
    warm-started), else from the model's own initialisation; ``model.warm_started`` names them."""
    import transformers

    from bertexport.core.tasks import get_task

    task = teacher_ckpt.task
    auto = getattr(transformers, get_task(task).auto_class)
    config = transformers.AutoConfig.from_pretrained(init.path)
    if task in _LABELLED:
        id2label = {int(k): v for k, v in (teacher_ckpt.config.get("id2label") or {}).items()}
        config.id2label, config.label2id = id2label, {v: k for k, v in id2label.items()}
        config.num_labels = len(id2label)
        config.problem_type = teacher_ckpt.config.get("problem_type")
    kwargs = dict(config=config, ignore_mismatched_sizes=True, use_safetensors=True, output_loading_info=True)
    try:
        try:
            model, info = auto.from_pretrained(init.path, attn_implementation="eager", **kwargs)
        except (TypeError, ValueError) as e:
            if "attn_implementation" not in str(e) and "attention" not in str(e):
                raise
            model, info = auto.from_pretrained(init.path, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        _refuse(init.source, f"could not be loaded: {first}")
    fresh = set(info.get("missing_keys") or []) | {m[0] for m in info.get("mismatched_keys") or []}
    if init.head.startswith("fresh") and task != "fill-mask":
        # a head of the same shape but other labels loads without complaint: initialise it anew
        for name, child in model.named_children():
            if name != model.base_model_prefix:
                child.apply(model._init_weights)
                fresh |= {f"{name}.{k}" for k in child.state_dict()}
    if teacher_model is not None and fresh and task != "fill-mask":
        import torch

        theirs = teacher_model.state_dict()
        mine = model.state_dict()
        warm = {k: theirs[k] for k in fresh if k in theirs and k in mine and theirs[k].shape == mine[k].shape}
        with torch.no_grad():
            for k, v in warm.items():
                mine[k].copy_(v)
        model.warm_started = sorted(warm)  # which fresh weights came from the teacher (the report says)
    return model.eval()
