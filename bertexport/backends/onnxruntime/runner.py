"""ONNX Runtime runner. Threads are pinned explicitly and spinning is off so a benchmark
that interleaves runtimes is not distorted by ORT's spin-waiting threads (ORT#13808)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bertexport.backends.base import Runner

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(self, model_path, threads: int | None = None, graph_optimization: str = "all",
                 providers: list[str] | None = None):
        super().__init__()
        self.model_path = Path(model_path)
        self.threads = threads
        if graph_optimization not in _LEVELS:
            raise ValueError(f"graph_optimization must be one of {', '.join(_LEVELS)}")
        self.graph_optimization = graph_optimization
        self.providers = list(dict.fromkeys([*(providers or []), "CPUExecutionProvider"]))
        self.session = None

    def activate_impl(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[self.graph_optimization])
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.model_path), sess_options=so, providers=self.providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        dtypes = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32", "tensor(bool)": "bool"}
        self.input_meta = {i.name: (dtypes.get(i.type), len(i.shape)) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feeds):
        outs = self.session.run(self.output_names, feeds)
        return {n: np.asarray(v) for n, v in zip(self.output_names, outs)}

    def deactivate_impl(self):
        self.session = None
