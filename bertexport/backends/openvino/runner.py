"""OpenVINO CPU runner.

The inference precision is always set explicitly: OpenVINO's CPU plugin runs bf16 by
default on CPUs that have it (AVX-512 BF16, AMX), which silently moves outputs. Profiles
say ``inference_precision = "f32" | "bf16" | "f16"`` and the manifest records it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bertexport.backends.base import Runner

PRECISIONS = ("f32", "bf16", "f16")


class OpenVinoRunner(Runner):
    name = "openvino"

    def __init__(self, model_path, threads: int | None = None, inference_precision: str = "f32",
                 performance_hint: str = "LATENCY", device: str = "CPU"):
        super().__init__()
        if inference_precision not in PRECISIONS:
            raise ValueError(f"inference_precision must be one of {', '.join(PRECISIONS)}")
        self.model_path = Path(model_path)
        self.threads = threads
        self.inference_precision = inference_precision
        self.performance_hint = performance_hint
        self.device = device
        self.compiled = None
        self.request = None

    def activate_impl(self):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": self.inference_precision, "PERFORMANCE_HINT": self.performance_hint}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = str(self.threads)
        self.compiled = core.compile_model(core.read_model(str(self.model_path)), self.device, config)
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.input_meta = {i.get_any_name(): (i.get_element_type().to_dtype().name, i.get_partial_shape().rank.get_length())
                           for i in self.compiled.inputs}
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    def infer_impl(self, feeds):
        result = self.request.infer(feeds, share_inputs=False, share_outputs=False)
        return {name: np.asarray(result[out]) for name, out in zip(self.output_names, self.compiled.outputs)}

    def deactivate_impl(self):
        self.request = None
        self.compiled = None
