"""``tensorrt-build``: ONNX -> serialized TensorRT engine with the TensorRT 10 Python API.

profile -> builder config -> engine: optimization profiles from the target's [shapes]
(plus extra ones); fp16 with LayerNorm, Softmax, GELU's Erf and the attention-mask
arithmetic pinned to fp32 under OBEY_PRECISION_CONSTRAINTS (the known fp16 overflow in
BERT LayerNorm and mask fill); int8 from a QDQ graph (``ort-static-quantize`` with
``for_tensorrt = true`` before this pass); a timing cache kept in the bertexport cache
and reused; builder log and progress surfaced through the reporter.

NOT VERIFIED ON A GPU HERE: exercised by Dockerfile.gpu.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from bertexport.core.cache import cache_dir
from bertexport.core.options import option
from bertexport.building.passes.base import Capability, ModelFile, Pass, PassContext


@dataclass
class TensorRtBuildConfig:
    fp16: bool = option(True, "allow fp16 kernels")
    int8: bool = option(False, "allow int8 kernels (the input must be a QDQ graph)")
    fp32_sensitive_layers: bool = option(True, "keep LayerNorm, Softmax, Erf and the mask arithmetic fp32 when fp16 (TensorRT#2564)")
    workspace_mb: int = option(2048, "builder workspace pool limit (MB)", min=64)
    extra_profiles: list[dict] = option(help="more optimization profiles: [{batch = [min, opt, max], sequence = [...]}]",
                                        default_factory=list)
    builder_optimization_level: int = option(3, "TensorRT builder optimization level", min=0, max=5)
    timing_cache: bool = option(True, "reuse the timing cache kept in the bertexport cache")


def _reporting_logger(trt, log):
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                log(f"[TensorRT {severity.name}] {msg}")

    return Logger()


def _progress_monitor(trt, log):
    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                log(f"TensorRT: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return Monitor()


class TensorRtBuild(Pass):
    """A serialized TensorRT engine from the ONNX graph (NVIDIA GPUs)."""

    name = "tensorrt-build"
    Config = TensorRtBuildConfig
    output_format = "tensorrt-engine"
    capability = Capability("tensorrt", "engine", needs_gpu=True)

    def run(self, model: ModelFile, config: TensorRtBuildConfig, ctx: PassContext) -> ModelFile:
        import tensorrt as trt

        from bertexport.backends.tensorrt.profiles import current_device, profile_ranges
        from bertexport.building.graph import fp32_node_names

        logger = _reporting_logger(trt, ctx.log)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(model.path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse the ONNX graph: {errors}")

        bc = builder.create_builder_config()
        bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
        bc.builder_optimization_level = config.builder_optimization_level
        bc.progress_monitor = monitor = _progress_monitor(trt, ctx.log)
        if config.fp16:
            bc.set_flag(trt.BuilderFlag.FP16)
        if config.int8:
            bc.set_flag(trt.BuilderFlag.INT8)  # scales come from the graph's Q/DQ nodes

        ranges = profile_ranges(ctx.profile, config.extra_profiles)
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        for r in ranges:
            prof = builder.create_optimization_profile()
            for t in inputs:
                prof.set_shape(t.name, r.min, r.opt, r.max)
            bc.add_optimization_profile(prof)

        pinned = 0
        if config.fp16 and config.fp32_sensitive_layers:
            keep = fp32_node_names(model.path)
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                if layer.type == trt.LayerType.NORMALIZATION or any(layer.name == k or layer.name.startswith(k + "_") for k in keep):
                    layer.precision = trt.float32
                    for j in range(layer.num_outputs):
                        layer.set_output_type(j, trt.float32)
                    pinned += 1
            bc.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            ctx.log(f"{pinned} layers pinned to fp32 (LayerNorm, Softmax, GELU Erf, attention-mask arithmetic)")

        cache_file = cache_dir("tensorrt") / f"timing-{trt.__version__}-{current_device().get('compute_capability', 'na')}.cache"
        if config.timing_cache:
            cache = bc.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
            bc.set_timing_cache(cache, ignore_mismatch=False)

        ctx.log("building the engine (first builds can take minutes, longer on edge devices)")
        serialized = builder.build_serialized_network(network, bc)
        del monitor
        if serialized is None:
            raise RuntimeError("TensorRT failed to build the engine (see the log above)")
        if config.timing_cache:
            cache_file.write_bytes(memoryview(bc.get_timing_cache().serialize()))

        engine = ctx.workdir / "model.engine"
        engine.write_bytes(memoryview(serialized))
        meta = {"tensorrt": trt.__version__, **current_device(), "fp16": config.fp16, "int8": config.int8,
                "profiles": [{"min": r.min, "opt": r.opt, "max": r.max} for r in ranges], "fp32_layers": pinned}
        meta_file = engine.with_suffix(".json")
        meta_file.write_text(json.dumps(meta, indent=2))
        return ModelFile(engine, "tensorrt-engine", files=[engine, meta_file], notes=meta)
