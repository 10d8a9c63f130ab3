"""The distillation settings (``DistillConfig``) and what follows from them alone: their
checks (before any model loads), the student -> teacher layer map, the weight of the
per-layer hidden-state loss and the schedule's steps."""
from __future__ import annotations

import math
from dataclasses import dataclass

from bertexport.core.errors import UserError
from bertexport.students.device import training_device
from bertexport.students.step_cost import training_precision


@dataclass
class DistillConfig:
    layers: int | None = None  # student layer count (every k-th teacher layer, last one kept)
    keep_layers: list[int] | None = None  # or explicit teacher layer indices
    student: str | None = None  # or a pre-trained smaller checkpoint sharing the vocabulary (--student-init)
    shape: str | None = None  # or a student shape ("L3-H256-F1024", bertexport.students.shapes): sliced from the teacher
    epochs: int = 3  # a fixed count of epochs (no early stop) when patience is None
    patience: int | None = None  # or: stop after this many held-out evaluations without a better score
    max_epochs: int = 10  # ... or at this many epochs (with patience only)
    stop_at_score: float | None = None  # with patience: stop once held-out agreement (cosine) reaches this ("target")
    cooldown: float = 0.2  # with patience, when it runs out: the learning rate decays linearly from where it is to 0
    # over this fraction of the steps run (at least two evaluations; ``cooldown_steps``), then training stops; 0: stop at once
    eval_every: int | None = None  # steps between held-out evaluations (None: EVALS_PER_EPOCH per epoch)
    batch_size: int = 32
    lr: float = 3e-4  # small students like higher rates than BERT fine-tuning (Turc et al.: 1e-4..3e-4; measured: docs/students.md)
    warmup: float = 0.06  # linear warmup over this fraction of the schedule (at most one epoch), then linear decay to 0
    temperature: float = 2.0
    alpha_kd: float = 1.0  # KL on logits (heads)
    alpha_ce: float = 0.5  # cross-entropy on labels (when the data has them)
    class_balance: float = 0.5  # text classification: each row's logit losses weighted by its teacher-predicted class's
    # share of the training rows to the power -class_balance, mean weight 1 (0: off; ``losses.class_weights``)
    alpha_cos: float = 1.0  # 1 - cosine of pooled embeddings (encoders)
    alpha_mse: float = 1.0  # MSE of last hidden states (encoders)
    alpha_hidden: float | None = None  # MSE of every student layer's hidden states vs its mapped teacher layer (TinyBERT);
    # None: chosen by data size, 1.0 from hidden_loss_min_texts training texts up, else 0 (``hidden_loss_weight``)
    hidden_loss_min_texts: int = 10_000
    alpha_attention: float = 1.0  # Q-Q/K-K/V-V self-attention relation KL, last student layer (MiniLMv2)
    relation_heads: int | None = None  # relation heads of alpha_attention (default: chosen from both widths)
    augment: int = 8  # teacher-labelled variants per training text (bertexport.students.augment) when the data is small
    augment_below: int = 5000  # ... i.e. has fewer texts than this
    max_length: int | None = None  # None: the data's length_percentile token length, capped by the model's (``sequence_length``)
    length_percentile: float = 99.0
    eval_fraction: float = 0.1
    checkpoint_every: int = 50  # steps
    seed: int = 0
    threads: int = 1
    device: str = "auto"  # auto | cpu | cuda: where training runs (bertexport.students.device)
    precision: str = "auto"  # auto | fp32 | bf16: the training step's forward and losses (auto: bf16 where the CPU
    # has it natively; bertexport.students.step_cost)
    dropout: float | None = 0.0  # the student's dropout while it trains (None: its checkpoint's; step_cost.training_dropout)
    max_tokens_per_batch: int = 64 * 1024  # out-of-memory guard: batch_size x max_length


EVALS_PER_EPOCH = 2  # held-out evaluations per epoch when ``eval_every`` is not given


def check_config(cfg: DistillConfig) -> None:
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.max_epochs < 1:
        raise UserError("batch_size, epochs and max_epochs must be >= 1")
    if cfg.patience is not None and cfg.patience < 1:
        raise UserError("patience must be >= 1 evaluation")
    if cfg.stop_at_score is not None and not 0 < cfg.stop_at_score <= 1:
        raise UserError("stop_at_score must be in (0, 1]")
    if not 0 <= cfg.cooldown <= 1:
        raise UserError("cooldown must be a fraction of the steps run, between 0 and 1")
    if cfg.eval_every is not None and cfg.eval_every < 1:
        raise UserError("eval_every must be >= 1 step")
    if not 0 <= cfg.warmup < 1 or not 0 < cfg.length_percentile <= 100 or cfg.hidden_loss_min_texts < 0:
        raise UserError("warmup must be in [0, 1), length_percentile in (0, 100], hidden_loss_min_texts >= 0")
    if cfg.max_length is not None and cfg.batch_size * cfg.max_length > cfg.max_tokens_per_batch:
        raise UserError(f"batch_size x max_length = {cfg.batch_size * cfg.max_length} tokens per batch risks running out of "
                        f"memory (limit {cfg.max_tokens_per_batch}); lower --batch-size or raise the limit deliberately")
    if cfg.augment < 0 or cfg.augment_below < 0:
        raise UserError("augment and augment_below must be >= 0")
    if not 0 <= cfg.class_balance <= 1:
        raise UserError("class_balance must be in [0, 1] (0: off, 0.5: inverse square root of a class's share, 1: inverse)")
    if min(cfg.alpha_hidden or 0, cfg.alpha_attention, cfg.alpha_kd, cfg.alpha_ce, cfg.alpha_cos, cfg.alpha_mse) < 0:
        raise UserError("loss weights (alpha_*) must be >= 0")
    if cfg.relation_heads is not None and cfg.relation_heads < 1:
        raise UserError("relation_heads must be >= 1")
    if cfg.layers is None and cfg.keep_layers is None and cfg.student is None and cfg.shape is None:
        raise UserError("say how small: --layers N, --keep-layers i,j,..., --shape L3-H256-F1024 or --student-init PATH")
    if cfg.shape and cfg.student:
        raise UserError("--shape builds the student from the teacher; it does not go with --student-init")
    if cfg.student and (cfg.layers is not None or cfg.keep_layers):
        raise UserError("--student-init is the student; it does not go with --layers or --keep-layers")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        raise UserError("dropout must be in [0, 1)")
    training_precision(cfg.precision, training_device(cfg.device))  # --device cuda without a GPU, bf16 emulated: refused


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


def hidden_loss_weight(cfg: DistillConfig, train_texts: int) -> tuple[float, str]:
    """The weight of the per-layer hidden-state loss and why: ``cfg.alpha_hidden`` when given;
    otherwise 1.0 with at least ``cfg.hidden_loss_min_texts`` original training texts (variants
    not counted: they add no new information), else 0 — matching every layer's hidden states
    overfits small data (Ko et al., EACL Findings 2023), so small data trains on the logits
    plus the last-layer relation loss only."""
    if cfg.alpha_hidden is not None:
        return float(cfg.alpha_hidden), "given"
    if train_texts >= cfg.hidden_loss_min_texts:
        return 1.0, f"{train_texts} training texts >= {cfg.hidden_loss_min_texts}"
    return 0.0, f"off: {train_texts} training texts < {cfg.hidden_loss_min_texts} (per-layer losses overfit small data)"


def cooldown_steps(cfg: DistillConfig, step: int, eval_every: int, total: int) -> int:
    """Steps of the cooldown that starts at ``step`` (patience run out, or the deadline that near):
    ``cfg.cooldown`` of the steps run, at least two evaluations, ending by the schedule's last
    step; 0 (stop now) without patience, with ``cooldown`` 0 or when less than one evaluation is left.

    Why: with patience the schedule decays towards ``max_epochs``, so a plateau is met at a high
    learning rate (at 85 % of its peak after 1.5 of 10 epochs), and the best state is an
    un-annealed one. A warmup-stable-decay schedule's short linear cooldown recovers what a
    schedule decayed to the known end would have reached (Hägele et al., NeurIPS 2024: a 20 %
    cooldown matches cosine). Measured on the news topics (2026-12-04, fp32, 4,925 untouched
    posts, one seed each): a 2-layer student of ``optimize`` stopped without a cooldown lost
    +1.16 points, with one +0.49 (paired: 0.67 points [0.29, 1.08] better); by hand on a
    schedule decayed to 0 at 4 epochs, +0.57."""
    if cfg.patience is None or cfg.cooldown <= 0:
        return 0
    steps = min(max(2 * eval_every, math.ceil(cfg.cooldown * step)), total - step)
    return steps if steps >= eval_every else 0


def schedule_steps(cfg: DistillConfig, steps_per_epoch: int) -> dict:
    """Steps of the schedule (the epoch count, or the cap with patience), warmup steps and
    steps between evaluations."""
    total = (cfg.max_epochs if cfg.patience is not None else cfg.epochs) * steps_per_epoch
    return {"total": total, "warmup": min(int(cfg.warmup * total), steps_per_epoch),
            "eval_every": cfg.eval_every or max(1, math.ceil(steps_per_epoch / EVALS_PER_EPOCH))}
