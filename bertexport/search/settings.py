"""The settings record of ``bertexport optimize`` (``OptimizeSettings``): one typed record,
its fields the command's options (``bertexport.cli.settings`` makes the Click options from
them); the gate fields come from the gate registry (``judging.gates``). Light on purpose:
the CLI imports it to build its options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bertexport.core.options import option
from bertexport.core.shared_settings import model_field, task_field
from bertexport.judging.gates import Gates, gate_field
from bertexport.search.candidates import SEARCHABLE_BACKENDS
from bertexport.search.replay import SAME_AS_BEFORE
from bertexport.students.device import DEVICES


@dataclass(kw_only=True)
class OptimizeSettings:
    """``bertexport optimize``: search for the fastest artifact that keeps the task accuracy."""

    model: str = model_field()
    data: Path | None = option(
        None, "Your task data (.csv/.tsv/.jsonl with a text and, for classification, a label column; or .txt); default: "
              "calib/ text, unlabelled.")
    out: Path = option(help="Artifact folder to create (the winner).", flag=("--out", "-o"))
    task: str | None = task_field()
    max_accuracy_drop: float | None = gate_field("max_accuracy_drop", fallback=True)
    max_macro_f1_drop: float | None = gate_field("max_macro_f1_drop")
    min_agreement: float | None = gate_field("min_agreement", fallback=True)
    min_cosine: float | None = gate_field("min_cosine", fallback=True)
    confidence: float | None = gate_field("confidence", "Decides the held-out verdict.", fallback=True)
    batch_invariant: bool = option(
        False, "Keep only candidates whose outputs do not depend on their batch neighbours (measured at build).")
    budget: str = option("20m", "Time budget for the search, e.g. 90s, 20m, 1h.")
    distill: str | None = option(
        None, "Also search students: 'auto' (a depth x width grid ordered by a latency cost model measured here), layer "
              "counts (e.g. 3,4: full width), or shapes (e.g. L3-H256-F1024,L2; missing parts are the teacher's).")
    distill_epochs: int | None = option(
        None, "A fixed count of training epochs per student; default: each trains until held-out agreement with the "
              "teacher stops improving (3 evaluations, 2 per epoch; at most 10 epochs; never past the budget).", min=1)
    distill_data: Path | None = option(
        None, "Training text for students, e.g. your training set (default: the search slice).")
    student_init: list[str] = option(
        help="Also a student from this pre-trained smaller checkpoint folder sharing the teacher's vocabulary "
             "(repeatable; e.g. a general-distilled MiniLM-L3): distilled like the others, named init:<folder> L<n>-H<n>.",
        default_factory=list, metavar="CHECKPOINT")
    device: str = option(
        "auto", "Where students train: auto takes the GPU when torch sees one; cuda without one is refused (exit 2).",
        choices=DEVICES)
    prune: str | None = option(
        None, "Also try the original after post-training pruning (text classification; no training, minutes): 'auto' "
              "(0.6, 0.75, 0.85 of its MACs; skipped with a reason for other models), fractions (e.g. 0.6,0.75), or "
              "'off' (the default).")
    early_exit: str = option(
        "off", "Also try an early-exit artifact (text classification): exit heads trained and the threshold chosen on the "
               "search slice, judged by the gate on the held-out slice; 'auto' skips other models with a reason, 'on' "
               "refuses them (exit 2).", choices=("off", "auto", "on"))
    calib: Path | None = option(None, "Calibration text for int8 recipes (default: calib/ set).")
    batch: int = option(1, "Batch size of the latency cell the search minimises.", min=1)
    sequence: int = option(128, "Sequence length of the latency cell.", min=1, flag="--seq")
    threads: int | None = option(None, "Threads for every candidate (pinned, reported); default: all cores.", min=1)
    backends: list[str] = option(
        help="Search only this backend (repeatable), e.g. the runtime your device has; default: every installed one.",
        default_factory=list, choices=tuple(SEARCHABLE_BACKENDS), flag="--backend")
    text_column: str | None = option(None, "Text column name (CSV/TSV/JSONL).")
    label_column: str | None = option(None, "Label column name (CSV/TSV/JSONL).")
    seed: int = option(0, "Seed of the search/confirm split.")
    search_again: bool = option(
        False, f"Search even when this search ({SAME_AS_BEFORE.removeprefix('the ')}) finished before; by default its "
               "result is replayed in seconds.")
    force: bool = option(False, "Replace --out if it is a bertexport artifact (never a folder of other files).")
    trust_remote_code: bool = option(False, "Allow custom model code shipped with the checkpoint (auto_map, *.py).")

    def gates(self) -> Gates:
        """The gates given (none: ``optimize`` falls back to the registry's defaults)."""
        return Gates(min_cosine=self.min_cosine, min_agreement=self.min_agreement,
                     max_accuracy_drop=self.max_accuracy_drop, max_macro_f1_drop=self.max_macro_f1_drop,
                     confidence=self.confidence)
