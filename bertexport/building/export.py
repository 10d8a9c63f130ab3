"""Export a PyTorch checkpoint to ONNX with dynamic batch and sequence axes.

optimum's ONNX exporter is used because it knows each family's real inputs (no
token_type_ids for RoBERTa/DistilBERT/DeBERTa without type vocab — optimum#1500) and
output names. Exports are cached by checkpoint hash, task, opset and library versions,
so converting one checkpoint to several targets exports once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bertexport.core.cache import cache_dir
from bertexport.building.checkpoint import Checkpoint
from bertexport.core.errors import UserError
from bertexport.core.hashing import sha256_file
from bertexport.core.progress import quiet

_DTYPES = {1: "float32", 7: "int64", 6: "int32", 10: "float16", 16: "bfloat16", 9: "bool"}


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list  # ints, or names of dynamic axes

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}


@dataclass
class ExportedModel:
    path: Path
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    cached: bool = False

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def io_specs(onnx_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)

    def spec(v):
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return TensorSpec(v.name, _DTYPES.get(t.elem_type, str(t.elem_type)), dims)

    return [spec(v) for v in m.graph.input], [spec(v) for v in m.graph.output]


def _cache_key(ckpt: Checkpoint, opset: int, variant: str = "") -> str:
    from bertexport.core.envinfo import package_versions
    from bertexport.core.hashing import cache_key

    versions = package_versions(("torch", "transformers", "optimum", "optimum-onnx", "onnx"))
    # the digest covers the checkpoint's code files; the flag decides whether that code ran
    return cache_key(ckpt.sha256, ckpt.task, opset, versions, ckpt.trust_remote_code, *([variant] if variant else []))


def export_onnx(ckpt: Checkpoint, model, opset: int = 18, *, use_cache: bool = True, variant: str = "") -> ExportedModel:
    """ONNX export of ``model`` (the loaded PyTorch original of ``ckpt``). ``variant`` names a
    rewrite of the model (e.g. ``first-token-skip/v1``): its export is cached apart."""
    from optimum.exporters.onnx import onnx_export_from_model

    folder = cache_dir("exports") / _cache_key(ckpt, opset, variant)
    onnx_path = folder / "model.onnx"
    if use_cache and onnx_path.is_file() and (folder / "DONE").is_file():
        if (folder / "DONE").read_text().strip() == sha256_file(onnx_path):
            ins, outs = io_specs(onnx_path)
            return ExportedModel(onnx_path, opset, ins, outs, cached=True)
    from bertexport.core.interrupts import track, untrack
    from bertexport.core.orphans import sweep_work_orphans

    sweep_work_orphans(folder.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-export-", dir=folder.parent))
    try:  # removed on success, failure and interruption alike
        track(tmp)
        try:
            # optimum and torch.onnx print a lot (warnings, traces); keep it for errors only.
            with quiet("optimum", "transformers", "torch.onnx") as chatter:
                onnx_export_from_model(model, tmp, opset=opset, task=ckpt.task, do_validation=False)
        except Exception as e:
            tail = "\n".join(chatter.getvalue().strip().splitlines()[-5:])
            raise UserError(f"ONNX export of {ckpt.family}/{ckpt.task} failed: {type(e).__name__}: {e}" + (f"\n{tail}" if tail else "")) from e
        produced = tmp / "model.onnx"
        if not produced.is_file():
            raise UserError(f"ONNX export of {ckpt.family}/{ckpt.task} wrote no model.onnx")
        # keep only the graph (+ external data); tokenizer/config come from the checkpoint itself
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for f in tmp.iterdir():
            if f.suffix in (".onnx", ".data") or f.name.endswith("onnx_data"):
                shutil.move(str(f), folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        untrack(tmp)
    (folder / "DONE").write_text(sha256_file(onnx_path))
    ins, outs = io_specs(onnx_path)
    return ExportedModel(onnx_path, opset, ins, outs, cached=False)
