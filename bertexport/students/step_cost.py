"""What a training step costs on a CPU, and the two settings that cut it without touching the
losses: the student's dropout while it trains (``training_dropout``) and the precision its
forward and losses run in (``training_precision``, ``autocast``).

Measured on a 2-core AMD EPYC Zen 4 (AVX-512 BF16; 2026-12-05, torch 2.13, a 2-layer
H384 student, 32 x 128 tokens, forward + backward + AdamW): 491 ms a step with BERT's dropout
(0.1 on hidden states and attention probabilities), 373 ms without it, 304 ms without it
under bf16 autocast. Dropout's random masks are the cost: on the 32 x 12 x 128 x 128
attention probabilities alone ~110 ms a step.
"""

from __future__ import annotations

import contextlib

PRECISIONS = ("auto", "fp32", "bf16")


def training_precision(requested: str, device: str) -> tuple[str, str]:
    """``fp32`` or ``bf16`` for ``requested`` (one of ``PRECISIONS``) on ``device``, and why.
    ``auto`` takes bf16 autocast on a CPU with native bf16 instructions (AVX-512 BF16 or AMX;
    ``core.envinfo.native_bf16``; without them bf16 is emulated and slower than fp32) and on a
    GPU that supports it; else fp32. ``bf16`` is refused where it would be emulated."""
    from bertexport.core.errors import UserError

    if requested not in PRECISIONS:
        raise UserError(f"--train-precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return "fp32", "asked for"
    supported, where = _bf16_supported(device)
    if requested == "bf16" and not supported:
        raise UserError(f"--train-precision bf16: {where}; use fp32 or auto")
    if supported:
        return "bf16", where if requested == "auto" else "asked for"
    return "fp32", where


def _bf16_supported(device: str) -> tuple[bool, str]:
    if device == "cuda":
        import torch

        ok = torch.cuda.is_bf16_supported()
        return ok, "the GPU supports bf16" if ok else "the GPU has no bf16"
    from bertexport.core.envinfo import native_bf16

    if native_bf16():
        return True, "the CPU has native bf16: AVX-512 BF16 or AMX"
    return False, "the CPU has no native bf16 instructions (neither AVX-512 BF16 nor AMX): bf16 would be emulated"


def autocast(precision: str, device: str):
    """The context a training step's forward and losses run in: bf16 autocast (matmuls in bf16,
    softmax, norms and losses in fp32 by torch's autocast lists; weights, gradients and AdamW
    stay fp32), or nothing for fp32."""
    if precision != "bf16":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device, dtype=torch.bfloat16)


@contextlib.contextmanager
def training_dropout(model, p: float | None):
    """Every dropout of ``model`` set to ``p`` while the context lasts (None: left as the
    checkpoint has it), restored after: the ``nn.Dropout`` modules and the rates attention
    modules pass to scaled-dot-product attention (``dropout_prob``). The config is not
    touched, so a saved student keeps its checkpoint's dropout for whoever fine-tunes it."""
    if p is None:
        yield
        return
    import torch

    saved = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            saved.append((module, "p", module.p))
            module.p = p
        value = getattr(module, "dropout_prob", None)
        if isinstance(value, float) and not isinstance(module, torch.nn.Dropout):
            saved.append((module, "dropout_prob", value))
            module.dropout_prob = p
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
