"""TensorRT runner (TensorRT 10 tensor API, buffers as torch CUDA tensors).

NOT VERIFIED ON A GPU HERE: exercised by Dockerfile.gpu's smoke test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bertexport.backends.base import Runner
from bertexport.backends.tensorrt.profiles import ShapeRange, check_engine_compat, current_device, pick_profile


class TensorRtRunner(Runner):
    name = "tensorrt"

    def __init__(self, model_path, device: int = 0):
        super().__init__()
        self.model_path = Path(model_path)
        self.device = device
        self.engine = None
        self.context = None
        self.ranges: list[ShapeRange] = []

    def activate_impl(self):
        import tensorrt as trt
        import torch

        meta_file = self.model_path.with_suffix(".json")  # written by the tensorrt-build pass
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        check_engine_compat(meta, {"tensorrt": trt.__version__} | current_device())
        torch.cuda.set_device(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(self.model_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {self.model_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        first = self.input_names[0]
        self.ranges = []
        for p in range(self.engine.num_optimization_profiles):
            lo, opt, hi = self.engine.get_tensor_profile_shape(first, p)
            self.ranges.append(ShapeRange(tuple(lo), tuple(opt), tuple(hi)))
        self._stream = torch.cuda.Stream()
        self._profile = 0

    def infer_impl(self, feeds):
        import tensorrt as trt
        import torch

        shape = feeds[self.input_names[0]].shape
        profile = pick_profile(self.ranges, shape)  # checked before anything touches the GPU
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, self._stream.cuda_stream)
            self._profile = profile
        keep = []
        for name in self.input_names:
            want = trt.nptype(self.engine.get_tensor_dtype(name))
            t = torch.from_numpy(np.ascontiguousarray(feeds[name], dtype=want)).cuda(self.device)
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.output_names:
            dims = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.zeros(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            t = torch.empty(dims, dtype=dtype, device=f"cuda:{self.device}")
            outs[name] = t
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self._stream.synchronize()
        return {n: t.float().cpu().numpy() for n, t in outs.items()}

    def deactivate_impl(self):
        self.context = None
        self.engine = None
