"""The settings record of ``bertexport distill`` (``DistillSettings``): one typed record, its
fields the command's options (``bertexport.cli.settings`` makes the Click options from
them), its ``validate()`` the rules that span several options. Light on purpose: the CLI
imports it to build its options."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from bertexport.core.errors import UserError
from bertexport.core.options import option
from bertexport.core.shared_settings import task_field
from bertexport.students.device import DEVICES
from bertexport.students.step_cost import PRECISIONS

# the fields that train: none of them goes with --prune (which trains nothing)
TRAINING_FIELDS = ("layers", "keep_layers", "student", "shape", "alpha_hidden", "alpha_attention", "class_balance",
                   "augment", "epochs", "patience", "max_epochs", "batch_size", "lr", "temperature", "device",
                   "train_precision", "train_dropout", "resume")


@dataclass(kw_only=True)
class DistillSettings:
    """``bertexport distill``: a smaller student checkpoint from TEACHER, or (``prune_fraction``)
    the teacher pruned after training, with no training."""

    teacher: str = option(help="The teacher checkpoint: a folder or a hub id.", argument=True)
    out: Path = option(help="Student checkpoint folder to create.", flag=("--out", "-o"))
    task: str | None = task_field()
    layers: int | None = option(None, "Student layer count (every k-th teacher layer kept).", min=1)
    keep_layers: list[int] | None = option(None, "Explicit teacher layer indices to keep, e.g. 1,3,5.", separator=",")
    student: str | None = option(
        None, "A pre-trained smaller checkpoint folder sharing the teacher's vocabulary (e.g. a general-distilled "
              "MiniLM-L3 or a BERT miniature), distilled with the same losses and given the teacher's task head "
              "(instead of --layers/--shape).", flag=("--student-init", "--student"), metavar="CHECKPOINT")
    shape: str | None = option(
        None, "Student shape sliced from the teacher, e.g. L3, L3-H256 or L3-H256-F1024 (L layers, H hidden size, F FFN "
              "size; missing parts are the teacher's).")
    alpha_hidden: float | None = option(
        None, "Weight of the hidden-state loss (each student layer vs its teacher layer; 0: off). Default: by data size, "
              "1.0 from 10000 training texts up, else off (per-layer losses overfit small data).", min=0)
    alpha_attention: float = option(
        1.0, "Weight of the Q/K/V self-attention relation loss (MiniLMv2, last layer; 0: off).", min=0)
    class_balance: float = option(
        0.5, "Text classification: weight each training text's distillation loss by its teacher-predicted class's share "
             "of the texts to the power -B (0: off, 0.5: inverse square root, 1: inverse), so a small student keeps "
             "rare classes.", min=0, max=1, metavar="B")
    augment: int = option(
        8, "Teacher-labelled variants per training text when the data has fewer than 5000 texts (0: none).", min=0)
    distill_data: Path | None = option(
        None, "Transfer text (.txt/.csv/.tsv/.jsonl; labels used when present); default: calib/.", flag="--data")
    epochs: int | None = option(
        None, "A fixed count of training epochs, no early stop (default 3; not with --patience).", min=1)
    patience: int | None = option(
        None, "Instead of --epochs: stop when held-out agreement with the teacher has not improved for this many "
              "evaluations (2 per epoch), keeping the best state; the learning rate is first cooled down to 0 over a "
              "fifth of the steps run.", min=1)
    max_epochs: int | None = option(None, "With --patience: the most epochs (default 10).", min=1)
    batch_size: int = option(32, "Training batch size.", min=1)
    lr: float = option(3e-4, "Peak learning rate (linear warmup, then linear decay to 0).", min=0, min_open=True)
    temperature: float = option(2.0, "Softmax temperature of the distillation loss.", min=0, min_open=True)
    seed: int = option(0, "Random seed (data split, order, init).")
    distill_threads: int = option(1, "Training threads.", min=1)
    device: str = option(
        "auto", "Where training runs: auto takes the GPU when torch sees one; cuda without one is refused (exit 2).",
        choices=DEVICES)
    train_precision: str = option(
        "auto", "Precision of the training step's forward and losses: auto takes bf16 autocast where the CPU has native "
                "bf16 (AVX-512 BF16 or AMX) or the GPU supports it, else fp32; bf16 where it would be emulated is refused "
                "(exit 2). Weights and optimizer stay fp32.",
        choices=PRECISIONS)
    train_dropout: float = option(
        0.0, "The student's dropout while it trains (default 0: off; it costs a CPU a quarter of each step, and the "
             "teacher's soft targets regularise). The saved student keeps the teacher's dropout in its config.",
        min=0, max=1, max_open=True, metavar="P")
    resume: bool = option(False, "Continue an interrupted run from its checkpoint.")
    prune_fraction: float | None = option(
        None, "Instead of training: post-training pruning of a text classifier to this fraction of its MACs (e.g. 0.75; "
              "heads/FFN neurons by Fisher information on --data, least-squares tuned, no gradient training).",
        flag="--prune", metavar="FRACTION")
    force: bool = option(False, "Replace --out if it is a bertexport student or pruned model (never a folder of other "
                                "files).")

    def training_options_set(self) -> list[str]:
        """The flags of the training fields that differ from their defaults (what --prune refuses)."""
        return [(f.metadata.get("flag") or ("--" + f.name.replace("_", "-"),))[0] for f in dataclasses.fields(self)
                if f.name in TRAINING_FIELDS and getattr(self, f.name) != f.default]

    def validate(self) -> None:
        if self.prune_fraction is not None:
            from bertexport.students.pruning import check_budget

            given = self.training_options_set()
            if given:
                raise UserError(f"--prune trains nothing: it does not go with {', '.join(given)}")
            check_budget(self.prune_fraction)
            if self.distill_data is None:
                raise UserError("--prune needs --data: your task's texts (.txt/.csv/.tsv/.jsonl; labels used when "
                                "present), on which heads and neurons are ranked")
            return
        if self.patience is not None and self.epochs is not None:
            raise UserError("--epochs is a fixed count; with --patience the cap is --max-epochs")
        if self.max_epochs is not None and self.patience is None:
            raise UserError("--max-epochs caps training with --patience; without it give --epochs")
