"""The teacher's intermediate outputs a student's losses need (``losses._Intermediate``: hidden
states of the mapped layers, the Q/K/V of the relation layer), computed in one pass over the
training batches and kept as memory-mapped float16 arrays, so training runs the student only.

Why: the teacher is frozen, in eval mode, and the batches are fixed for a run (``length_batches``),
so its outputs are the same every epoch; computing them on the fly ran a whole teacher forward
per training step. Measured on a MiniLM-L6 teacher (32 x 128 tokens, 2 cores, 2026-12-05): the
teacher's forward 0.35 s a batch against 0.34 s for a 1-layer student's whole step and 0.84 s
for a 3-layer one's, i.e. half and a third of their training time.

Layout: one ``.npy`` per tensor (``h{i}``: hidden state ``i``, 0 the embeddings' output;
``qkv{l}``: layer ``l``'s query, key and value), every batch's tokens one after another
(``(tokens, width)``, or ``(3, tokens, width)``); a batch's rows are found from the batches'
shapes. float16 (relative error ~5e-4, under the loss's own noise); a value beyond its range
leaves the teacher computed on the fly. Written under a temporary name and renamed: an
interrupted pass leaves no half array. Not cached (computed on the fly as before, with the
reason logged) when the arrays one student reads would pass ``MAX_BYTES``, or writing them would
leave less than ``FREE_MARGIN`` of the disk free.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

MAX_BYTES = 8 * 2 ** 30  # past this the arrays may not stay in the page cache of a small machine
FREE_MARGIN = 2 * 2 ** 30  # disk left free after writing them
_F16_MAX = float(np.finfo(np.float16).max)


def _name(key: tuple) -> str:
    kind, index = key
    return f"{kind}{index}"


class TeacherIntermediates:
    """The cached tensors of one teacher on one set of batches: ``folder/{prefix}inter-{name}.npy``."""

    def __init__(self, folder: Path, prefix: str, batches: list):
        self.folder, self.prefix = Path(folder), prefix
        sizes = [int(b["inputs"]["input_ids"].shape[0]) * int(b["inputs"]["input_ids"].shape[1]) for b in batches]
        self.shapes = [tuple(b["inputs"]["input_ids"].shape) for b in batches]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.arrays: dict[tuple, np.ndarray] = {}

    def path(self, key: tuple) -> Path:
        return self.folder / f"{self.prefix}inter-{_name(key)}.npy"

    def bytes_needed(self, keys: list, width: int, missing_only: bool = True) -> int:
        """float16 bytes of the ``keys`` (those not on disk yet, unless ``missing_only`` is False)."""
        per = int(self.offsets[-1]) * width * 2
        return sum(per * (3 if k[0] == "qkv" else 1) for k in keys if not (missing_only and self.path(k).is_file()))

    def refusal(self, keys: list, width: int) -> str | None:
        """Why the ``keys`` cannot be cached here (the arrays one student reads past ``MAX_BYTES``,
        too little disk space for those to write), or None."""
        total, need = self.bytes_needed(keys, width, missing_only=False), self.bytes_needed(keys, width)
        if total > MAX_BYTES:
            return f"{total / 2 ** 30:.1f} GiB of teacher states > {MAX_BYTES / 2 ** 30:.0f} GiB"
        self.folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.folder).free
        if need and free - need < FREE_MARGIN:
            return f"{need / 2 ** 30:.1f} GiB of teacher states would leave {max(0, free - need) / 2 ** 30:.1f} GiB free"
        return None

    def load_or_compute(self, keys: list, width: int, compute) -> str | None:
        """Map the ``keys``' arrays; those missing are computed by ``compute(missing)``, which
        yields, batch by batch, ``{key: array of (batch, tokens, width) or (3, batch, tokens, width)}``,
        written straight into float16 arrays on disk. Returns None, or why nothing is cached (a
        value beyond float16's range: then no array of this pass is kept)."""
        missing = [k for k in keys if not self.path(k).is_file()]
        if missing:
            tokens = int(self.offsets[-1])
            tmps = {k: self.path(k).with_suffix(".tmp.npy") for k in missing}
            try:
                out = {k: np.lib.format.open_memmap(tmps[k], mode="w+", dtype=np.float16,
                                                    shape=(3, tokens, width) if k[0] == "qkv" else (tokens, width))
                       for k in missing}
                for i, got in enumerate(compute(missing)):
                    a, b = int(self.offsets[i]), int(self.offsets[i + 1])
                    for k in missing:
                        v = np.asarray(got[k], dtype=np.float32)
                        if not np.isfinite(v).all() or float(np.abs(v).max(initial=0.0)) >= _F16_MAX:
                            return f"a teacher {_name(k)} value beyond float16's range"
                        out[k][..., a:b, :] = v.reshape((3, -1, width) if k[0] == "qkv" else (-1, width))
                for k in missing:
                    out[k].flush()
                    os.replace(tmps[k], self.path(k))
            finally:
                out = None
                for t in tmps.values():
                    t.unlink(missing_ok=True)
        for k in keys:
            self.arrays[k] = np.load(self.path(k), mmap_mode="r")
        return None

    def batch(self, key: tuple, index: int, device):
        """Batch ``index``'s tensor of ``key`` as float32 on ``device``: (batch, tokens, width),
        or a list of three for Q/K/V."""
        import torch

        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        rows, tokens = self.shapes[index]
        arr = self.arrays[key]
        if key[0] == "qkv":
            return [torch.from_numpy(np.asarray(arr[j, a:b], dtype=np.float32)).view(rows, tokens, -1).to(device)
                    for j in range(3)]
        return torch.from_numpy(np.asarray(arr[a:b], dtype=np.float32)).view(rows, tokens, -1).to(device)


def remove_cached(folder: Path) -> int:
    """Delete every cached intermediate array in ``folder`` (a search's teacher folder, at its
    end: they are large and cheap to compute again); the bytes freed."""
    freed = 0
    for f in Path(folder).glob("*inter-*.npy"):
        freed += f.stat().st_size
        f.unlink(missing_ok=True)
    return freed
