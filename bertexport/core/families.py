"""The model families and tasks bertexport compiles, and how a checkpoint maps to them.

A ``Family`` record is the one place a family's structure is written down (like optimum's
per-architecture configs): its config keys for depth, width, heads and FFN size, the names of
its attention projections, the modules width pruning slices, the named graph regions of its
export, and what a feature cannot do with it (``limits``). Every other module reads it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from bertexport.core.tasks import TASKS  # noqa: F401  (the task registry; re-exported for checkpoint resolution)

# Architecture-name suffix -> task, from the task records; the bare "Model" suffix is
# checked last (every head's class name ends in something longer).
_ARCH_SUFFIX_TO_TASK = tuple(sorted(((sfx, t.name) for t in TASKS.values() for sfx in t.arch_suffixes),
                                    key=lambda st: st[0] == "Model"))


# Named graph regions: what a recipe or a search keeps in float is said by region
# ("ffn_output"), never by per-family regexes in profiles. Patterns match ONNX node names
# ("/bert/encoder/layer.3/output/dense/MatMul") and OpenVINO's names of graphs converted
# from PyTorch ("__module.deberta.encoder.layer.3.output.dense/aten::linear/MatMul"), so
# separators are [./]. ``layer`` is the transformer layer index.
_S = r"[./]"


def _regions(layer: str, qkv: str, attn_out: str, ffn_in: str, ffn_out: str) -> dict[str, str]:
    pre = rf".*{layer}\.(?P<layer>\d+){_S}"
    return {
        "attention_qkv": rf"{pre}{qkv}{_S}.*MatMul.*",
        "attention_output": rf"{pre}{attn_out}{_S}.*MatMul.*",
        "ffn_input": rf"{pre}{ffn_in}{_S}.*MatMul.*",
        "ffn_output": rf"{pre}{ffn_out}{_S}.*MatMul.*",
        "head": r".*(pooler|classifier|pre_classifier|qa_outputs|lm_head|cls|generator_predictions|vocab_projector)(\b|[./_]).*(MatMul|Gemm).*",
    }


_BERT_REGIONS = _regions("layer", rf"attention{_S}self{_S}(query|key|value|query_proj|key_proj|value_proj|pos_key_proj|pos_query_proj)",
                         rf"attention{_S}output{_S}dense", rf"intermediate{_S}dense", rf"output{_S}dense")
REGIONS = ("attention_qkv", "attention_output", "ffn_input", "ffn_output", "head")


def check_region_spec(spec: str) -> None:
    """``region`` or ``region@layer``; raises ValueError naming the regions otherwise."""
    region, _, layer = spec.partition("@")
    if region not in REGIONS or (layer and not layer.isdigit()):
        raise ValueError(f"{spec!r} is not a region: use one of {', '.join(REGIONS)}, optionally @LAYER (e.g. ffn_output@3)")


def region_pattern(regions: dict[str, str], spec: str) -> str:
    check_region_spec(spec)
    region, _, layer = spec.partition("@")
    pattern = regions[region]
    return pattern.replace(r"(?P<layer>\d+)", f"(?P<layer>{layer})") if layer else pattern


@dataclass(frozen=True)
class Width:
    """Where a family keeps the parts width pruning slices (module names inside one layer)."""

    qkv: tuple[str, ...]  # Linears whose output rows are heads
    attn_out: str  # Linear whose input columns are heads (it reads the attention context)
    ffn_in: str  # Linear whose output rows are FFN neurons
    ffn_out: str  # Linear whose input columns are FFN neurons (it reads the activation)
    extra_hidden_keys: tuple[str, ...] = ()  # config keys that must follow the hidden size


_BERT_WIDTH = Width(("attention.self.query", "attention.self.key", "attention.self.value"),
                    "attention.output.dense", "intermediate.dense", "output.dense")


@dataclass(frozen=True)
class Family:
    """Everything bertexport knows about one architecture family."""

    model_type: str
    display: str
    tokenizer_kind: str  # wordpiece | bpe | sentencepiece
    regions: dict = field(default_factory=lambda: dict(_BERT_REGIONS), hash=False)
    # config keys (as ``config.json`` spells them), first present wins
    layers_key: tuple[str, ...] = ("num_hidden_layers",)
    hidden_key: tuple[str, ...] = ("hidden_size",)
    heads_key: tuple[str, ...] = ("num_attention_heads",)
    ffn_key: tuple[str, ...] = ("intermediate_size",)  # the feed-forward width
    # names of the query, key and value Linear modules inside a layer's attention
    qkv: tuple[str, str, str] = ("query", "key", "value")
    width: Width | None = None  # what width pruning slices (None: only layers can be dropped)
    # the ModuleList of transformer layers, under the base model (None: layers are not one list each)
    layers_module: str | None = "encoder.layer"
    # feature (a pass name, ...) -> why it cannot serve this family
    limits: dict = field(default_factory=dict, hash=False)
    # state-dict key of a transformer layer (distillation drops layers by remapping it)
    layer_key: str = r"^(.*\.layer\.)(\d+)(\..*)$"
    shared_layers: bool = False  # ALBERT: one layer group shared by every layer
    position_offset: bool = False  # RoBERTa-style: positions start after pad_token_id
    openvino_source: str = "onnx"  # what OpenVINO converts from: onnx | pytorch

    def config_value(self, config: dict, keys: tuple[str, ...], default=None):
        return next((config[k] for k in keys if k in config), default)

    @property
    def shape_keys(self) -> tuple[str, ...]:
        """The config keys that say what size a model of this family is."""
        return self.layers_key + self.hidden_key + self.heads_key + self.ffn_key

    def patterns(self, specs: list[str]) -> list[str]:
        """Regexes over node names for region specs: ``ffn_output`` (every layer) or
        ``ffn_output@3`` (layer 3 only)."""
        return [region_pattern(self.regions, spec) for spec in specs]


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("bert", "BERT (incl. MiniLM, TinyBERT)", "wordpiece", width=_BERT_WIDTH),
        Family("roberta", "RoBERTa", "bpe", position_offset=True, width=_BERT_WIDTH),
        Family("xlm-roberta", "XLM-RoBERTa", "sentencepiece", position_offset=True, width=_BERT_WIDTH),
        Family("camembert", "CamemBERT", "sentencepiece", position_offset=True, width=_BERT_WIDTH),
        Family("albert", "ALBERT", "sentencepiece", shared_layers=True, layers_module=None,
               limits={"first-token-skip": "one layer's weights are shared by every layer"},
               regions=_regions("albert_layers", rf"attention{_S}(query|key|value)", rf"attention{_S}dense",
                                "ffn", "ffn_output")),
        # width pruning of ELECTRA also needs embedding_size == hidden_size (students.shapes checks it)
        Family("electra", "ELECTRA", "wordpiece", width=replace(_BERT_WIDTH, extra_hidden_keys=("embedding_size",))),
        Family("distilbert", "DistilBERT", "wordpiece",
               layers_key=("n_layers",), hidden_key=("dim",), heads_key=("n_heads",), ffn_key=("hidden_dim",),
               layers_module="transformer.layer",
               qkv=("q_lin", "k_lin", "v_lin"),
               width=Width(("attention.q_lin", "attention.k_lin", "attention.v_lin"), "attention.out_lin",
                           "ffn.lin1", "ffn.lin2"),
               regions=_regions("layer", rf"attention{_S}(q_lin|k_lin|v_lin)", rf"attention{_S}out_lin",
                                rf"ffn{_S}lin1", rf"ffn{_S}lin2")),
        # OpenVINO's CPU plugin rejects DeBERTa-v2's ONNX export (If nodes of dynamic rank):
        # it converts from PyTorch instead
        Family("deberta-v2", "DeBERTa-v2/v3", "sentencepiece", openvino_source="pytorch",
               qkv=("query_proj", "key_proj", "value_proj"),
               limits={"first-token-skip": "its relative-position attention (c2p/p2c) is not rewritten"}),
        Family("mpnet", "MPNet", "wordpiece", qkv=("q", "k", "v"),
               limits={"first-token-skip": "its relative position bias is not rewritten"},
               regions=_regions("layer", rf"attention{_S}attn{_S}(q|k|v)", rf"attention{_S}attn{_S}o",
                                rf"intermediate{_S}dense", rf"output{_S}dense")),
        Family("mobilebert", "MobileBERT", "wordpiece",
               limits={"first-token-skip": "its bottleneck layers are not rewritten"},
               regions=_regions("layer", rf"attention{_S}self{_S}(query|key|value)", rf"attention{_S}output{_S}dense",
                                rf"(ffn\.\d+{_S})?intermediate{_S}dense", rf"(ffn\.\d+{_S}output|output){_S}dense")),
    )
}


def get_family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        from bertexport.core.errors import UserError

        raise UserError(f"model_type '{model_type}' is not a supported BERT-family model; supported: {supported_families_text()}")
    return FAMILIES[model_type]


def layer_count(config) -> int:
    """A transformers config's transformer layer count, by its family's key."""
    for k in get_family(config.model_type).layers_key:
        if hasattr(config, k):
            return int(getattr(config, k))
    from bertexport.core.errors import UserError

    raise UserError(f"cannot find the layer count of {type(config).__name__}")


def supported_families_text() -> str:
    return ", ".join(FAMILIES)


def task_from_architectures(architectures: list[str] | None) -> str | None:
    """The task a checkpoint's trained head serves, from ``config.architectures``."""
    for arch in architectures or ():
        for suffix, task in _ARCH_SUFFIX_TO_TASK:
            if arch.endswith(suffix):
                return task
    return None


def tasks_served(detected: str | None) -> tuple[str, ...]:
    """Tasks a checkpoint can serve without a random-init head: its own, plus embeddings
    from its encoder (every checkpoint has one)."""
    if detected is None or detected == "feature-extraction":
        return ("feature-extraction",)
    return (detected, "feature-extraction")
