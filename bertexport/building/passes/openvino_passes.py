"""OpenVINO passes: ONNX -> IR conversion, int8 weight compression, and NNCF full int8
post-training quantization on calibration text.

NNCF is told the model is a transformer (``ModelType.TRANSFORMER``): without it NNCF
quantizes patterns that break transformer accuracy (anomalib#2298), and it keeps
LayerNorm, Softmax and the like in float. ``ignored_types``/``ignored_names`` add to that.
"""

from __future__ import annotations

from dataclasses import dataclass

from bertexport.core.families import check_region_spec, get_family
from bertexport.core.options import option
from bertexport.core.progress import quiet
from bertexport.building.passes.base import Capability, ModelFile, Pass, PassContext


def _ir_files(xml) -> list:
    return [xml, xml.with_suffix(".bin")]


def _save(model, ctx: PassContext, name: str, compress_to_fp16: bool = False) -> ModelFile:
    import openvino as ov

    xml = ctx.workdir / f"{name}.xml"
    ov.save_model(model, str(xml), compress_to_fp16=compress_to_fp16)
    return ModelFile(xml, "openvino-ir", files=_ir_files(xml))




@dataclass
class ConvertConfig:
    compress_to_fp16: bool = option(False, "store weights as fp16 (half the size; computed at the inference precision)")
    source: str = option("auto", "what OpenVINO converts: the ONNX export, the PyTorch model, or auto (the family's record decides)",
                         choices=("onnx", "pytorch", "auto"))


def _convert_from_pytorch(ctx: PassContext):
    """ov.convert_model on the PyTorch original, with the same input and output names
    and dynamic batch/sequence axes as the ONNX export."""
    import openvino as ov
    import torch

    class Outputs(torch.nn.Module):
        def __init__(self, model, inputs, outputs):
            super().__init__()
            self.model, self.inputs, self.outputs = model, inputs, outputs

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                feeds["token_type_ids"] = token_type_ids
            out = self.model(**feeds)
            return {k: out[k] for k in self.outputs}

    example = {k: torch.from_numpy(v) for k, v in ctx.encode(["a short example", "and a somewhat longer one"]).items()}
    wrapped = Outputs(ctx.torch_model, ctx.input_names, ctx.output_names)
    shapes = [(n, ov.PartialShape([-1, -1]), ov.Type.i64) for n in ctx.input_names]
    converted = ov.convert_model(wrapped, example_input=example, input=shapes)
    # a traced input can carry an extra internal tensor name ({'attention_mask', '59'} on BERT),
    # and runners address inputs by any one name: keep exactly the export's names
    for port, name in zip(converted.inputs, ctx.input_names):
        port.get_tensor().set_names({name})
    return converted


class OpenVinoConvert(Pass):
    """ONNX (or PyTorch, per the family's record) to OpenVINO IR."""

    name = "openvino-convert"
    Config = ConvertConfig
    capability = Capability("openvino", "fp32")
    output_format = "openvino-ir"

    def run(self, model: ModelFile, config: ConvertConfig, ctx: PassContext) -> ModelFile:
        import openvino as ov

        source = config.source
        if source == "auto":
            # families.Family.openvino_source: DeBERTa-v2's ONNX export has If nodes of dynamic
            # rank that OpenVINO's CPU plugin cannot compile
            source = "pytorch" if get_family(ctx.family).openvino_source == "pytorch" and ctx.torch_model is not None else "onnx"
        if source == "pytorch":
            if ctx.torch_model is None:
                raise RuntimeError("openvino-convert source=pytorch needs the PyTorch model")
            ctx.log(f"converting from PyTorch ({ctx.family})")
            if model.notes.get("first_token_skip"):  # the ONNX input skips compute: convert the same rewrite
                from bertexport.building.passes.first_token_skip import first_token_only

                with first_token_only(ctx.torch_model):
                    ov_model = _convert_from_pytorch(ctx)
            else:
                ov_model = _convert_from_pytorch(ctx)
        else:
            ov_model = ov.convert_model(str(model.path))
        out = _save(ov_model, ctx, "model", config.compress_to_fp16)
        out.notes = {"source": source}
        return out


@dataclass
class CompressWeightsConfig:
    mode: str = option("int8_asym", "int8 weight compression scheme", choices=("int8_asym", "int8_sym"))


class OpenVinoCompressWeights(Pass):
    """int8 weights, float activations: no calibration data, small accuracy cost."""

    name = "openvino-compress-weights"
    Config = CompressWeightsConfig
    capability = Capability("openvino", "int8-weights")
    input_format = "openvino-ir"
    output_format = "openvino-ir"

    def run(self, model: ModelFile, config: CompressWeightsConfig, ctx: PassContext) -> ModelFile:
        import nncf
        import openvino as ov

        ov_model = ov.Core().read_model(str(model.path))
        mode = {"int8_asym": nncf.CompressWeightsMode.INT8_ASYM, "int8_sym": nncf.CompressWeightsMode.INT8_SYM}[config.mode]
        with quiet("nncf"):
            compressed = nncf.compress_weights(ov_model, mode=mode)
        return _save(compressed, ctx, "model.int8w")


@dataclass
class NncfQuantizeConfig:
    preset: str = option("mixed", "mixed: symmetric weights, asymmetric activations; performance: symmetric both",
                         choices=("mixed", "performance"))
    subset_size: int = option(300, "calibration sentences", min=1)
    fast_bias_correction: bool = option(True, "NNCF's fast bias correction (false: the slower full one)")
    smooth_quant_alpha: float | None = option(None, "SmoothQuant alpha for MatMuls (none: NNCF's transformer default; -1 disables)",
                                              min=-1, max=1)
    ignored_types: list[str] = option(help="op types left float, e.g. Multiply", default_factory=list)
    ignored_names: list[str] = option(help="node names left float", default_factory=list)
    keep_float: list[str] = option(help="named regions left float: attention_qkv, attention_output, ffn_input, ffn_output, head "
                                        "(optionally @LAYER)", default_factory=list)

    def validate(self):
        for spec in self.keep_float:
            check_region_spec(spec)


class NncfQuantize(Pass):
    """Full int8 (weights and activations) with NNCF post-training quantization."""

    name = "nncf-quantize"
    Config = NncfQuantizeConfig
    capability = Capability("openvino", "int8", needs_calibration=True, fast_with=("avx512_vnni", "avx_vnni", "amx_int8"))
    input_format = "openvino-ir"
    output_format = "openvino-ir"

    def run(self, model: ModelFile, config: NncfQuantizeConfig, ctx: PassContext) -> ModelFile:
        import nncf
        import openvino as ov

        texts = ctx.calibration_texts()[: config.subset_size]
        # one sentence per item at its own length: the calibration sees real lengths
        items = [ctx.encode([t], padding="longest") for t in texts]
        ov_model = ov.Core().read_model(str(model.path))
        ignored = None
        patterns = get_family(ctx.family).patterns(config.keep_float) if config.keep_float else []
        if config.ignored_types or config.ignored_names or patterns:
            ignored = nncf.IgnoredScope(types=config.ignored_types, names=config.ignored_names,
                                        patterns=patterns, validate=False)
        advanced = None
        if config.smooth_quant_alpha is not None:
            advanced = nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=config.smooth_quant_alpha))
        preset = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}[config.preset]
        ctx.log(f"NNCF calibration on {len(items)} sentences")
        kwargs = dict(preset=preset, target_device=nncf.TargetDevice.CPU, subset_size=len(items),
                      fast_bias_correction=config.fast_bias_correction, model_type=nncf.ModelType.TRANSFORMER)
        if ignored is not None:
            kwargs["ignored_scope"] = ignored
        if advanced is not None:
            kwargs["advanced_parameters"] = advanced
        with quiet("nncf"):
            quantized = nncf.quantize(ov_model, nncf.Dataset(items), **kwargs)
        out = _save(quantized, ctx, "model.int8")
        out.notes = {"calibration_items": len(items)}
        return out
