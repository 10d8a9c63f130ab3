"""Where a student trains: ``--device auto|cpu|cuda`` (``distill``, ``optimize``'s students).

``auto`` takes the GPU when torch sees one (``torch.cuda.is_available()``), else the CPU;
``cuda`` without one is refused before any work (exit 2). The step's precision is
``bertexport.students.step_cost``'s (``--train-precision``: bf16 autocast where the CPU or GPU
has bf16, weights and optimizer fp32). Distillation on a GPU: not verified here (no GPU on
the machines this was built on).
"""

from __future__ import annotations

from bertexport.core.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def training_device(requested: str = "auto") -> str:
    """``cpu`` or ``cuda`` for ``requested`` (one of ``DEVICES``); raises UserError when
    ``cuda`` is asked for and torch sees no GPU."""
    import torch

    if requested not in DEVICES:
        raise UserError(f"--device {requested!r}: choose one of {', '.join(DEVICES)}")
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        raise UserError(f"--device cuda: torch sees no GPU ({build}, torch {torch.__version__}); use --device cpu or auto")
    if requested == "auto":
        return "cuda" if available else "cpu"
    return requested


def device_record(device: str, requested: str) -> dict:
    """What the report records: the device used, what was asked for, the GPU's name."""
    import torch

    rec = {"used": device, "requested": requested}
    if device == "cuda":
        rec["name"] = torch.cuda.get_device_name(torch.cuda.current_device())
    return rec


def batches_on_device(batches, device: str):
    """The batches' tensors on ``device`` (the training device; nothing moves on the CPU)."""
    if device == "cpu":
        return batches
    for b in batches:
        b["inputs"] = {k: v.to(device) for k, v in b["inputs"].items()}
        if "labels" in b:
            b["labels"] = b["labels"].to(device)
    return batches
