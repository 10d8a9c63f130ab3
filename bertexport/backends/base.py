"""The small base every backend's runner implements (after Polygraphy's BaseRunner):
``activate`` loads, ``infer`` runs a feed dict of numpy arrays and returns named numpy
outputs, ``deactivate`` frees; a runner is also a context manager. Feeds are checked here,
for every backend, against the input metadata the model declares (names, dtypes, ranks):
a mismatch is an error that names it, never a silent cast."""

from __future__ import annotations

import time

import numpy as np


class Runner:
    name = "runner"

    def __init__(self):
        self.is_active = False
        self.load_seconds: float | None = None

    # -- template methods -------------------------------------------------
    def activate(self) -> "Runner":
        if not self.is_active:
            t0 = time.perf_counter()
            self.activate_impl()
            self.load_seconds = time.perf_counter() - t0
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise RuntimeError(f"{self.name}: activate() the runner before infer()")
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"{self.name}: missing input(s) {missing}; the model takes {self.input_names}")
        for n in self.input_names:
            meta = self.input_meta.get(n)
            if meta is None:
                continue
            dtype, rank = meta
            a = feeds[n]
            if dtype is not None and np.dtype(a.dtype) != np.dtype(dtype):
                raise ValueError(f"{self.name}: input {n} is {a.dtype}, the model declares {dtype}")
            if rank is not None and a.ndim != rank:
                raise ValueError(f"{self.name}: input {n} has {a.ndim} dimensions, the model declares {rank}")
        return self.infer_impl({n: np.ascontiguousarray(feeds[n]) for n in self.input_names})

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    # -- for subclasses ---------------------------------------------------
    input_names: list[str] = []
    input_meta: dict[str, tuple[str | None, int | None]] = {}  # name -> (numpy dtype, rank), set at activate

    def activate_impl(self) -> None:
        raise NotImplementedError

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass
