"""``distill``: a smaller student from any BERT-family teacher (same family and tokenizer).

The student keeps every k-th teacher layer (or an explicit list), DistilBERT-style; or is
a shape (``--shape L3-H256-F1024``) sliced from the teacher by ``bertexport.students.shapes``
(layers by measured effect, heads/FFN neurons/hidden dimensions by importance on the
data); or is a pre-trained smaller checkpoint the user gives (``--student-init``,
``bertexport.students.pretrained``: same vocabulary, checked before any weights load).
The settings and their checks are ``bertexport.students.distill_config``; the rows and
batches ``bertexport.students.training_data``; the training loop (logit KD + cross-entropy,
TinyBERT hidden-state MSE, MiniLMv2 Q/K/V relations; held-out evaluations, patience,
checkpoints an interrupted run resumes from with ``resume=True``) is
``bertexport.students.training.train_student``; the report ``bertexport.students.distill_report``.
Nothing is published to ``out`` until training ends.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from bertexport.core.staging import StagedFolder, check_destination
from bertexport.building.checkpoint import load_model, load_tokenizer, resolve_checkpoint
from bertexport.core.errors import UserError
from bertexport.core.families import get_family, layer_count as _layer_count
from bertexport.students.distill_config import DistillConfig, check_config, default_layer_map
from bertexport.students.distill_report import distill_report
from bertexport.students.settings import DistillSettings
from bertexport.students.pretrained import check_student_init, load_init_student, student_tokenizer, training_tokenizer
from bertexport.students.shapes import keep_every, shrink
from bertexport.students.training import train_student
from bertexport.students.training_data import TeacherOutputs, length_batches, sequence_length, split_eval
from bertexport.core.progress import Reporter
from bertexport.students import shapes as students


@dataclass
class DistillResult:
    student: Path
    report: dict = field(default_factory=dict)


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
    batches = length_batches(tok, [texts[i] for i in sample], None, cfg.batch_size,
                              sequence_length(tok, texts, cfg, teacher_model.config), cfg.seed)
    work.mkdir(parents=True, exist_ok=True)
    outs = TeacherOutputs(work / "teacher-shape.npz", task).load_or_compute(teacher_model, batches, reporter.log)
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
    check_config(cfg)
    ts = load_texts(data) if data else TextSet(builtin_calibration(), source="builtin:calib")
    if len(ts.texts) < 16:
        raise UserError(f"{len(ts.texts)} texts are too few to distill on (need >= 16)")
    shape = _check_layers(cfg, ckpt)  # before the teacher loads
    # --student-init: vocabulary, family, size, task checked from configs and tokenizers, before any weights load
    init = check_student_init(cfg.student, ckpt, ts.texts, cfg.max_length) if cfg.student else None
    if init is not None and out == init.path:
        raise UserError(f"--out {out} is the --student-init checkpoint; write the student to another folder")
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
    teacher_tok = tok
    try:  # from here the work folder fills (a shaped student's scores first, then training's caches)
        if init is not None:
            with reporter.step(f"load student {init.name} (head: {init.head})"):
                student = load_init_student(init, ckpt, teacher_model)
            tok = training_tokenizer(teacher_tok, init)  # the inputs both models take
            keep, shape_info = None, {"init": init.to_dict(),
                                      "warm_started_from_teacher": getattr(student, "warm_started", [])}
        elif shape is not None:
            with reporter.step(f"build student {shape.name}"):
                student, keep, shape_info = _shaped_student(teacher_model, tok, shape, ts.texts, labels, ckpt.task, cfg,
                                                            work, reporter)
        else:
            keep = cfg.keep_layers or keep_every(teacher_layers, cfg.layers)
            student = shrink(teacher_model, keep)
        layer_map = default_layer_map(teacher_layers, keep, _layer_count(student.config))
        best, trained = train_student(teacher_model, student, tok, ts.texts, labels, ckpt.task, cfg, work, reporter,
                                      layer_map, on_step=on_step, teacher_id=ckpt.sha256)
    except BaseException:  # interrupted or failed: the work folder stays only if --resume can continue it
        if (work / "checkpoint.pt").is_file():
            reporter.log(f"resume state kept in {work}: `--resume` continues from its last checkpoint")
        else:
            shutil.rmtree(work, ignore_errors=True)
        raise
    _, eval_idx = split_eval(len(ts.texts), cfg)  # the held-out texts train_student evaluated on (outputs cached in work)
    eval_b = length_batches(tok, [ts.texts[i] for i in eval_idx], [labels[i] for i in eval_idx] if labels is not None else None,
                             cfg.batch_size, trained["max_length"], cfg.seed)
    teacher_eval = TeacherOutputs(work / "teacher-eval.npz", ckpt.task).load_or_compute(teacher_model, eval_b, reporter.log)
    report = distill_report(ckpt, teacher_model, best, keep, teacher_layers, trained, eval_b, teacher_eval, cfg, ts, shape_info)
    with StagedFolder(out, force=force or resume, protect=[ckpt.path] + ([init.path] if init else []),
                      what="student folder") as staged:
        best.save_pretrained(staged.staging, safe_serialization=True)
        (student_tokenizer(teacher_tok, ckpt.family, init) if init else teacher_tok).save_pretrained(staged.staging)
        (staged.staging / "distill_report.json").write_text(json.dumps(report, indent=2) + "\n")
        staged.publish(True)
    shutil.rmtree(work, ignore_errors=True)
    return DistillResult(out, report)


def distill_command(settings: DistillSettings, reporter: Reporter | None = None):
    """``bertexport distill`` as a library call: with ``settings.prune_fraction`` the teacher
    pruned after training on ``--data`` (``students.pruning.prune_data``; a ``PruneResult``),
    else a student distilled (``distill``; a ``DistillResult``). The rules spanning options
    were checked when the record was built (``DistillSettings.validate``)."""
    s = settings
    if s.prune_fraction is not None:
        from bertexport.students.pruning import prune_data

        return prune_data(s.teacher, s.distill_data, s.out, mac_budget=s.prune_fraction, task=s.task, force=s.force,
                          seed=s.seed, threads=s.distill_threads)
    given = {"epochs": s.epochs, "max_epochs": s.max_epochs}  # None: DistillConfig's default (3 epochs, cap 10)
    cfg = DistillConfig(layers=s.layers, keep_layers=s.keep_layers, student=s.student, shape=s.shape,
                        alpha_hidden=s.alpha_hidden, alpha_attention=s.alpha_attention, class_balance=s.class_balance,
                        augment=s.augment, patience=s.patience, batch_size=s.batch_size, lr=s.lr, temperature=s.temperature, seed=s.seed,
                        threads=s.distill_threads, device=s.device, precision=s.train_precision,
                        dropout=s.train_dropout, **{k: v for k, v in given.items() if v is not None})
    return distill(s.teacher, s.out, task=s.task, data=s.distill_data, config=cfg, resume=s.resume, force=s.force,
                   reporter=reporter)


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
