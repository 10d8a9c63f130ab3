"""ONNX Runtime's transformer optimizer: fuses attention, LayerNorm, GELU and
embedding subgraphs of BERT-like graphs into ORT contrib ops."""

from __future__ import annotations

from dataclasses import dataclass

from bertexport.core.families import get_family
from bertexport.core.options import option
from bertexport.building.passes.base import Capability, ModelFile, Pass, PassContext



@dataclass
class OrtOptimizeConfig:
    opt_level: int = option(1, "0 none, 1 basic fusions (portable), 2 extended, 99 all (hardware-specific layouts)",
                            choices=(0, 1, 2, 99))
    enable_gelu_approximation: bool = option(False, "tanh GELU: faster, changes outputs slightly")


class OrtTransformersOptimize(Pass):
    """ONNX Runtime's transformer fusions (attention, LayerNorm, GELU, embeddings)."""

    name = "ort-transformers-optimize"
    Config = OrtOptimizeConfig
    capability = Capability("onnxruntime", "fp32")

    def run(self, model: ModelFile, config: OrtOptimizeConfig, ctx: PassContext) -> ModelFile:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        fam = get_family(ctx.family)
        heads = fam.config_value(ctx.model_config, fam.heads_key, 0)
        hidden = fam.config_value(ctx.model_config, fam.hidden_key, 0)
        options = FusionOptions("bert")
        options.enable_gelu_approximation = config.enable_gelu_approximation
        optimized = optimize_model(
            str(model.path),
            model_type="bert",  # BertOnnxModel handles the encoder graphs of every family here
            num_heads=heads,
            hidden_size=hidden,
            optimization_options=options,
            opt_level=config.opt_level,
            use_gpu=False,
        )
        fused = optimized.get_fused_operator_statistics()
        ctx.log(f"fused operators: {', '.join(f'{k}={v}' for k, v in fused.items() if v) or 'none'}")
        out = ctx.workdir / "model.optimized.onnx"
        optimized.save_model_to_file(str(out))
        return ModelFile(out, "onnx", notes={"fused_operators": {k: v for k, v in fused.items() if v}})
