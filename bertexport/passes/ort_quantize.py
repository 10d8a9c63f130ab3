"""ONNX Runtime int8 quantization.

Dynamic quantization (weights int8 offline, activations quantized per call) needs no
calibration data. What breaks BERT-family accuracy, and what this pass does about it:
- ``reduce_range`` (7-bit weights) is what ORT's AVX2/AVX-512 (non-VNNI) preset uses to
  avoid saturation; on all-MiniLM-L6-v2 it dropped min cosine to 0.60 here. The ``isa``
  option picks it deliberately per CPU family.
- per-tensor weights lose more than per-channel (ORT#11286, ORT#5644): per-channel is the default.
- some MatMuls of a trained model are far more sensitive than others (FFN in/out, value
  projections): ``target_min_cosine`` runs a sensitivity scan over calibration sentences and
  keeps the most sensitive MatMuls in fp32 until the target is met (mixed precision),
  instead of shipping a collapsed model (ORT#9599, pytorch#27949).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass


from bertexport.families import check_region_spec
from bertexport.graph import sensitive_nodes, weight_nodes
from bertexport.options import option
from bertexport.progress import quiet
from bertexport.passes.base import Capability, ModelFile, Pass, PassContext, keep_float_nodes



# ISA presets for dynamic int8 (weights / reduce_range), as ORT and optimum use them.
_ISA_REDUCE_RANGE = {"avx512_vnni": False, "arm64": False, "avx2": True, "avx512": True}


@dataclass
class DynamicQuantizeConfig:
    isa: str = option("avx512_vnni", "ORT's int8 preset for the CPU family (sets reduce_range)", choices=tuple(_ISA_REDUCE_RANGE))
    per_channel: bool = option(True, "per-channel weight scales (per-tensor loses more: ORT#11286, #5644)")
    reduce_range: bool | None = option(None, "7-bit weights (none: from isa)")
    weight_type: str = option("qint8", "int8 weight type", choices=("qint8", "quint8"))
    op_types: list[str] = option(help="op types to quantize (Gather too would quantize embeddings)",
                                 default_factory=lambda: ["MatMul"])
    exclude_nodes: list[str] = option(help="node names left fp32", default_factory=list)
    keep_float: list[str] = option(help="named regions left fp32: attention_qkv, attention_output, ffn_input, ffn_output, head "
                                        "(optionally @LAYER)", default_factory=list)
    target_min_cosine: float | None = option(None, "sensitivity scan: keep the worst MatMuls fp32 until calibration cosine meets this",
                                             min=0, max=1, min_open=True)
    max_excluded_fraction: float = option(0.35, "most MatMuls the scan may keep fp32 (fraction)", min=0, max=1)
    sensitivity_samples: int = option(48, "calibration sentences the scan scores on", min=1)

    def validate(self):
        for spec in self.keep_float:
            check_region_spec(spec)

    @property
    def effective_reduce_range(self) -> bool:
        return _ISA_REDUCE_RANGE[self.isa] if self.reduce_range is None else self.reduce_range


def _scan_cache_file(model_path, texts: list[str], config: DynamicQuantizeConfig):
    """Where the sensitivity scan of this export, on these texts, with these settings is kept."""
    import onnxruntime

    from bertexport.cache import cache_dir
    from bertexport.hashing import sha256_file

    key = json.dumps([sha256_file(model_path), hashlib.sha256("\n".join(texts).encode()).hexdigest(),
                      asdict(config), onnxruntime.__version__], sort_keys=True)
    return cache_dir("sensitivity") / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


class _Scorer:
    """Min cosine of a candidate ONNX model against the fp32 input model on calibration feeds."""

    def __init__(self, fp32_path, ctx: PassContext, samples: int):
        from bertexport.backends.onnxruntime.runner import OrtRunner
        from bertexport.compare import min_cosine

        self._runner_cls, self._min_cosine = OrtRunner, min_cosine
        texts = ctx.calibration_texts()[:samples]
        # dynamic int8 scales activations per tensor over the whole batch, so a padded
        # batch (as a server sends) is harder than one sentence: score both
        self.batches = [ctx.encode(texts[i:i + 16], padding="max_length", length=64) for i in range(0, len(texts), 16)]
        self.batches += [ctx.encode([t], padding="longest") for t in texts[:8]]
        self.task, self.threads = ctx.task, ctx.threads
        self.reference = self._run(fp32_path)

    def _run(self, path):
        with self._runner_cls(path, threads=self.threads) as r:
            return [r.infer(b) for b in self.batches]

    def __call__(self, path) -> float:
        outs = self._run(path)
        return min(self._min_cosine(ref, out, self.task, b["attention_mask"])
                   for ref, out, b in zip(self.reference, outs, self.batches))


class OrtDynamicQuantize(Pass):
    """Dynamic int8 (weights offline, activations per call), optional sensitivity-guided fp32 fallback."""

    name = "ort-dynamic-quantize"
    Config = DynamicQuantizeConfig
    capability = Capability("onnxruntime", "int8", fast_with=("avx512_vnni", "avx_vnni", "amx_int8", "asimddp"))

    def _quantize(self, src, dst, config: DynamicQuantizeConfig, exclude, only=None):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with quiet("root"):  # ORT's quantizer logs an advisory on every call
            self._quantize_impl(quantize_dynamic, QuantType, src, dst, config, exclude, only)

    def _quantize_impl(self, quantize_dynamic, QuantType, src, dst, config, exclude, only):
        kwargs = {}
        if only is not None:
            kwargs["nodes_to_quantize"] = only
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=config.per_channel,
            reduce_range=config.effective_reduce_range,
            weight_type=QuantType.QInt8 if config.weight_type == "qint8" else QuantType.QUInt8,
            op_types_to_quantize=config.op_types,
            nodes_to_exclude=list(exclude),
            # ORT-optimized graphs lose value_info for fused weights; without a default the
            # quantizer fails with "Unable to find data type for weight_name".
            extra_options={"DefaultTensorType": 1},
            **kwargs,
        )

    def run(self, model: ModelFile, config: DynamicQuantizeConfig, ctx: PassContext) -> ModelFile:
        out = ctx.workdir / "model.int8.onnx"
        exclude = list(config.exclude_nodes) + keep_float_nodes(model.path, config.keep_float, ctx.family)
        notes: dict = {"excluded_nodes": exclude, "reduce_range": config.effective_reduce_range}
        if config.target_min_cosine is None:
            self._quantize(model.path, out, config, exclude)
            return ModelFile(out, "onnx", notes=notes)
        cache = _scan_cache_file(model.path, ctx.calibration_texts()[: config.sensitivity_samples], config)
        if cache.is_file():  # same export, texts and settings: the scan's answer is known
            notes = json.loads(cache.read_text())
            self._quantize(model.path, out, config, notes["excluded_nodes"])
            ctx.log(f"sensitivity scan reused from the cache: {len(notes['excluded_nodes'])} MatMul(s) kept fp32")
            return ModelFile(out, "onnx", notes=notes | {"scan": "cached"})
        self._quantize(model.path, out, config, exclude)
        exclude, notes = self._sensitivity_exclusion(model, out, config, ctx, exclude)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps(notes))
        os.replace(tmp, cache)
        return ModelFile(out, "onnx", notes=notes | {"scan": "ran"})

    def _sensitivity_exclusion(self, model, out, config, ctx: PassContext, exclude):
        score = _Scorer(model.path, ctx, config.sensitivity_samples)
        achieved = score(out)
        notes = {"reduce_range": config.effective_reduce_range, "target_min_cosine": config.target_min_cosine,
                 "all_int8_min_cosine": achieved}
        if achieved >= config.target_min_cosine:
            ctx.log(f"int8 min cosine {achieved:.4f} meets target {config.target_min_cosine}: no fp32 fallback")
            return exclude, notes | {"excluded_nodes": exclude, "achieved_min_cosine": achieved}
        candidates = [n for n in weight_nodes(model.path, config.op_types) if n not in exclude]
        ctx.log(f"int8 min cosine {achieved:.4f} < target {config.target_min_cosine}: scanning {len(candidates)} nodes")
        probe = ctx.workdir / "probe.onnx"
        sensitivity = {}
        for node in candidates:  # each node quantized alone: how much does it cost?
            self._quantize(model.path, probe, config, [], only=[node])
            sensitivity[node] = score(probe)
        ranked = sorted(candidates, key=lambda n: sensitivity[n])
        limit = max(1, int(len(candidates) * config.max_excluded_fraction))
        best = (achieved, [])
        k = 1
        while k <= limit:
            trial = exclude + ranked[:k]
            self._quantize(model.path, probe, config, trial)
            c = score(probe)
            ctx.log(f"fp32 fallback for {k} most sensitive node(s): min cosine {c:.4f}")
            if c > best[0]:
                best = (c, ranked[:k])
                probe.replace(out)
            if c >= config.target_min_cosine:
                break
            k = k + 1 if k < 4 else int(k * 1.5)
        if best[0] < config.target_min_cosine:
            ctx.log(f"the scan's target {config.target_min_cosine} (how hard the fp32 fallback tries) was not reached with "
                    f"up to {limit} fp32 MatMuls; best {best[0]:.4f} with {len(best[1])} kept fp32. "
                    "The profile's parity gate (checked next) decides whether the build passes.")
        probe.unlink(missing_ok=True)
        final = exclude + best[1]
        return final, notes | {
            "excluded_nodes": final,
            "kept_fp32": len(best[1]),
            "why": (f"{len(best[1])} of {len(candidates)} weight MatMuls kept fp32: the most sensitive ones, restored one "
                    f"by one until the calibration min cosine reached the scan target {config.target_min_cosine} "
                    f"(achieved {best[0]:.4f}); the artifact's gate is the profile's [validation] tolerance"),
            "achieved_min_cosine": best[0],
            "sensitivity": {n: round(sensitivity[n], 6) for n in ranked[: max(len(best[1]), 8)]},
        }




# -- static (QDQ) quantization --------------------------------------------------------

_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


@dataclass
class StaticQuantizeConfig:
    calibration_method: str = option("minmax", "activation range calibration", choices=tuple(_CALIBRATION))
    calibration_samples: int = option(200, "calibration sentences (\"around 200 examples is enough\": optimum docs)", min=1)
    percentile: float = option(99.999, "percentile calibration's cut", min=0, max=100, min_open=True)
    per_channel: bool = option(True, "per-channel weight scales")
    activation_type: str = option("quint8", "int8 activation type", choices=("qint8", "quint8"))
    weight_type: str = option("qint8", "int8 weight type", choices=("qint8", "quint8"))
    symmetric_activations: bool = option(False, "symmetric activation ranges")
    op_types: list[str] = option(help="op types to quantize", default_factory=lambda: ["MatMul"])
    exclude_sensitive: bool = option(True, "keep LayerNorm, GELU, Softmax + mask Add, embedding and residual Adds float (optimum#151)")
    exclude_nodes: list[str] = option(help="node names left float", default_factory=list)
    keep_float: list[str] = option(help="named regions left float (families.REGIONS, optionally @LAYER)", default_factory=list)
    # TensorRT's explicit quantization wants symmetric int8, a Q/DQ pair on weights and one
    # pair per consumer (optimum PR#407/#812, onnxruntime-inference-examples#56)
    for_tensorrt: bool = option(False, "TensorRT's explicit quantization: symmetric, Q/DQ on weights, dedicated pairs")

    def validate(self):
        for spec in self.keep_float:
            check_region_spec(spec)


class _TextReader:
    """ORT CalibrationDataReader over tokenized sentences, one per batch: batch > 1 breaks
    histogram calibrators (optimum#409) and multiplies memory (ORT#10503)."""

    def __init__(self, items):
        self._it = iter(items)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - part of the reader protocol
        pass


class OrtStaticQuantize(Pass):
    """Static int8 in QDQ format, calibrated on text: the format TensorRT and ORT's
    int8 kernels consume."""

    name = "ort-static-quantize"
    Config = StaticQuantizeConfig
    capability = Capability("onnxruntime", "int8", needs_calibration=True, fast_with=("avx512_vnni", "avx_vnni", "amx_int8"))

    def run(self, model: ModelFile, config: StaticQuantizeConfig, ctx: PassContext) -> ModelFile:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        texts = ctx.calibration_texts()[: config.calibration_samples]
        if config.calibration_method == "minmax":
            items = [ctx.encode([t], padding="longest") for t in texts]
        else:  # histogram calibrators stack all items: they need one shape
            longest = max(ctx.encode([t])["input_ids"].shape[1] for t in texts)
            items = [ctx.encode([t], padding="max_length", length=longest) for t in texts]
        exclude = list(config.exclude_nodes)
        if config.exclude_sensitive:
            exclude += sensitive_nodes(model.path)
        exclude += keep_float_nodes(model.path, config.keep_float, ctx.family)
        exclude = sorted(set(exclude))
        qt = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
        extra = {"ActivationSymmetric": config.symmetric_activations, "WeightSymmetric": True}
        act_type = config.activation_type
        if config.for_tensorrt:
            extra |= {"ActivationSymmetric": True, "AddQDQPairToWeight": True, "DedicatedQDQPair": True,
                      "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
            act_type = "qint8"
        if config.calibration_method == "percentile":
            extra["CalibPercentile"] = config.percentile
        out = ctx.workdir / "model.qdq.onnx"
        ctx.log(f"calibrating ({config.calibration_method}) on {len(items)} sentences; {len(exclude)} nodes kept float")
        with quiet("root"):  # ORT's quantizer logs an advisory on every call
            quantize_static(
                str(model.path), str(out), _TextReader(items),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=config.op_types,
                per_channel=config.per_channel,
                activation_type=qt[act_type],
                weight_type=qt[config.weight_type],
                nodes_to_exclude=exclude,
                calibrate_method=getattr(CalibrationMethod, _CALIBRATION[config.calibration_method]),
                extra_options=extra,
            )
        return ModelFile(out, "onnx", notes={"calibration_items": len(items), "excluded_nodes": len(exclude)})
