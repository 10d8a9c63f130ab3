"""The settings records of the judging commands (``validate``, ``benchmark``): one typed
record per command, its fields the command's options (``bertexport.cli.settings`` makes
the Click options from them). Light on purpose: the CLI imports it to build its options.

The gate options are the registry's (``judging.gates``): flag, range and help come from
its records, so a gate flag and the library cannot disagree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bertexport.core.shared_settings import threads_field, trusted_key_field
from bertexport.core.errors import UserError
from bertexport.core.options import option
from bertexport.judging.gates import Gates, gate_field


@dataclass(kw_only=True)
class ValidateSettings:
    """``bertexport validate``: task accuracy and agreement of ARTIFACT vs its PyTorch original, gated."""

    artifact: Path = option(help="The artifact folder to validate.", argument=True)
    data: Path | None = option(
        None, "Labelled data (.csv/.tsv/.jsonl: text[, text_pair], label) or plain text; default: calib/samples.txt.")
    model: str | None = option(None, "The PyTorch original (default: the checkpoint named in the manifest).")
    max_accuracy_drop: float | None = gate_field("max_accuracy_drop")
    max_macro_f1_drop: float | None = gate_field("max_macro_f1_drop")
    min_agreement: float | None = gate_field("min_agreement")
    min_cosine: float | None = gate_field("min_cosine")
    confidence: float | None = gate_field("confidence")
    report_only: bool = option(False, "No gate: measure and report only (exit 0 unless the input is bad).")
    text_column: str | None = option(None, "Text column name (CSV/TSV/JSONL).")
    label_column: str | None = option(None, "Label column name (CSV/TSV/JSONL).")
    limit: int | None = option(None, "Use only the first N rows.", min=1)
    threads: int = threads_field()
    junit: Path | None = option(None, "Write a JUnit XML report for CI systems.")
    force: bool = option(False, "Compare even if --model is not the checkpoint the artifact was built from.")
    trusted_key: Path | None = trusted_key_field()

    @property
    def gates(self) -> Gates:
        """The gates given (``None``: not gated)."""
        return Gates(min_cosine=self.min_cosine, min_agreement=self.min_agreement,
                     max_accuracy_drop=self.max_accuracy_drop, max_macro_f1_drop=self.max_macro_f1_drop,
                     confidence=self.confidence)

    def validate(self) -> None:
        if not self.gates.any() and not self.report_only:
            raise UserError("no gate given: pass --max-accuracy-drop, --max-macro-f1-drop, --min-agreement and/or --min-cosine "
                            "(or --report-only to measure without a gate)")


@dataclass(kw_only=True)
class BenchmarkSettings:
    """``bertexport benchmark``: latency/throughput (and accuracy) of the PyTorch original and
    each artifact, interleaved; or, with ``compare_files``, two reports side by side."""

    model: str | None = option(None, "The PyTorch original (a checkpoint folder or hub id); may be omitted when "
                                     "artifacts are given (the manifest names it), or be the first artifact.",
                               argument=True)
    artifacts: list[Path] = option(help="Artifact folders to time.", default_factory=list, argument=True)
    targets: list[str] = option(help="Also convert MODEL for this profile (cached) and include it; repeatable.",
                                default_factory=list, flag=("--target", "-t"))
    batches: list[int] = option(help="Batch sizes, comma-separated.", default_factory=lambda: [1], min=1,
                                separator=",", flag="--batch")
    sequences: list[int] = option(help="Sequence lengths, comma-separated.", default_factory=lambda: [128], min=1,
                                  separator=",", flag="--seq")
    texts: Path | None = option(None, "Also time a 'real lengths' cell over this text file.")
    data: Path | None = option(None, "Labelled data: adds accuracy per candidate.")
    data_limit: int | None = option(None, "Use only the first N rows of --data.", min=1)
    runs: int = option(30, "Timed runs per candidate per cell (>= 5).", min=5)
    warmup: int = option(5, "Untimed warm-up runs per candidate per cell.", min=0)
    turn: int = option(1, "Calls per candidate in each interleaved round. Above 1 the report adds back-to-back "
                          "latency (the turn's later calls, a busy server) beside the first call after another "
                          "candidate ran (a sporadic request).", min=1)
    threads: int = threads_field(help="Threads for every candidate (pinned, reported).")
    out_dir: Path | None = option(None, "Folder for benchmark.json/.md/.png.", flag="--out")
    force: bool = option(False, "Compare artifacts built from different checkpoints; replace an existing --out "
                                "benchmark folder.")
    reference: bool | None = option(
        None, "Time the PyTorch original too (default: when PyTorch is installed; a device times the artifacts alone).",
        flag="--reference/--no-reference")
    compare_files: tuple[Path, Path] | None = option(
        None, "Print two benchmark reports side by side (e.g. the build host's and a device's) and exit.",
        flag="--compare", metavar="HOST.json DEVICE.json")
    trusted_key: Path | None = trusted_key_field()
