"""The settings records of the building commands (``convert``, ``targets``): one typed
record per command, its fields the command's options (``bertexport.cli.settings`` makes
the Click options from them). Light on purpose: the CLI imports it to build its options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bertexport.core.errors import UserError
from bertexport.core.options import option
from bertexport.core.shared_settings import model_field, task_field, threads_field

@dataclass(kw_only=True)
class ConvertSettings:
    """``bertexport convert``: compile MODEL for a target profile into an artifact folder."""

    model: str = model_field()
    target: str = option(help="Target profile name (see `bertexport targets`) or path to a .toml profile.",
                         flag=("--target", "-t"))
    out: Path = option(help="Artifact folder to create.", flag=("--out", "-o"))
    task: str | None = task_field()
    calib: Path | None = option(None, "Calibration text (.txt/.csv/.tsv/.jsonl); default: calib/ set.")
    samples: Path | None = option(
        None, "Your texts (.txt/.csv/.tsv/.jsonl) to judge the profile's parity gate on, instead of the built-in "
              "validation texts (calib/samples.txt + calib/validation_en.txt).", flag=("--data", "--samples"))
    text_column: str | None = option(None, "Text column of --data and --calib (CSV/TSV/JSONL/JSON/Parquet).")
    threads: int = threads_field()
    latency_runs: int | None = option(None, "Timed runs per side (0 skips timing); default from the profile.", min=0)
    force: bool = option(False, "Replace --out if it is a bertexport artifact (never a folder of other files).")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) when MODEL is a hub id.")
    allow_pickle: bool = option(False, "Allow pytorch_model.bin (pickle) weights, which can run code when loaded.")
    trust_remote_code: bool = option(False, "Allow custom model code shipped with the checkpoint (auto_map, *.py).")
    distill_layers: int | None = option(
        None, "First distill MODEL to a student with this many layers, then convert the student.", min=1, flag="--distill")
    distill_data: Path | None = option(None, "Transfer text for --distill (default: calib/).")
    distill_epochs: int = option(3, "Training epochs for --distill.", min=1)
    early_exit_data: Path | None = option(
        None, "Text classification: build an early-exit artifact, exit heads trained on these texts (labels used when "
              "present) with the model frozen, run as segments compiled by the profile (e.g. ort-fp32, ort-int8, "
              "openvino-int8; docs/early-exit.md).",
        flag="--early-exit")
    exit_layers: list[int] | None = option(
        None, "With --early-exit: layers to exit after, e.g. 2,4 (default: every second layer).", min=1, separator=",",
        metavar="N,N")
    exit_agreement: float = option(
        0.99, "With --early-exit: the threshold chosen is the smallest keeping this agreement with the full model on "
              "held-out rows.", min=0.0, max=1.0, min_open=True)
    exit_threshold: float | None = option(
        None, "With --early-exit: use this threshold instead of choosing one (1.0 never exits).", min=0.0, max=1.0)
    sign_key: Path | None = option(None, "Sign the artifact with this private key (PEM) when it passes.")

    def validate(self) -> None:
        if self.early_exit_data is None and (self.exit_layers or self.exit_threshold is not None):
            raise UserError("--exit-layers and --exit-threshold go with --early-exit DATA")
        if self.early_exit_data is not None and (self.distill_layers or self.calib):
            raise UserError("--early-exit builds the model as it is: it does not take --distill or --calib")


@dataclass(kw_only=True)
class TargetsSettings:
    """``bertexport targets``: the built-in target profiles, or one profile's or pass's options."""

    describe_name: str | None = option(None, "Describe one profile or pass: its settings and options.",
                                       flag="--describe", metavar="NAME")
