"""first-token-skip: exact compute skipping in the last transformer layer.

A sequence classifier of these families reads one vector: the first token's (BERT's
pooler, RoBERTa/XLM-R/CamemBERT/ELECTRA's classification heads ``features[:, 0]``,
DistilBERT's ``hidden_state[:, 0]``). In the last layer every other position's output is
computed and thrown away. This pass rewrites that layer so it computes the query,
attention context, attention output + LayerNorm and the FFN for the first token only;
keys and values are still computed for every token (the first token attends to all of
them). The logits are the same computation, so they match the unskipped model to float
rounding, and the last layer costs ~1/S of its FFN and attention-output work at length S.

How: before the ONNX export, the last layer instance's ``forward`` (and its
self-attention's) is replaced by an explicit computation from the layer's own submodules
(``types.MethodType`` on the instance, restored afterwards). Module names do not change,
so ONNX node names stay those of the plain export (``/bert/encoder/layer.5/attention/self/
query/MatMul``) and the families' named regions still match. Head count and head size are
read from the modules (width-pruned students have their own). The attention masks
transformers 4.57 hands a layer are all understood: a [B, S] keep-mask (DistilBERT eager),
additive [B, 1, 1, S] (BERT-style eager) or [B, 1, S, S] (SDPA), a boolean keep-mask, or
none (SDPA when nothing is padded).

The PyTorch original is left as it was (the parity check compares against it); the
rewritten export is cached apart from the plain one.
"""

from __future__ import annotations

import math
import types
from contextlib import contextmanager
from dataclasses import dataclass

from bertexport.core.errors import UserError
from bertexport.core.families import FAMILIES as ALL_FAMILIES
from bertexport.core.options import option
from bertexport.building.passes.base import Capability, ModelFile, Pass, PassContext

NAME = "first-token-skip"
VERSION = 1  # part of the export cache key: bump when the rewrite changes
TASK = "text-classification"
# the families whose last layer the rewrite serves: those whose record has no limit on it
FAMILIES = tuple(name for name, f in ALL_FAMILIES.items() if NAME not in f.limits)


def check_supported(family: str, task: str, config: dict | None = None) -> None:
    """Refuse (``UserError``) what the rewrite does not serve; runs before any model loads."""
    if family not in FAMILIES:
        why = ALL_FAMILIES[family].limits.get(NAME) if family in ALL_FAMILIES else None
        raise UserError(f"{NAME} does not support {family}{f' ({why})' if why else ''}; "
                        f"supported families: {', '.join(FAMILIES)}")
    if task != TASK:
        raise UserError(f"{NAME} serves {TASK} only (its head reads the first token alone); this model's task is {task}")
    config = config or {}
    position = config.get("position_embedding_type", "absolute")  # DistilBERT's config has none: absolute
    if position not in (None, "absolute"):
        raise UserError(f"{NAME} needs absolute position embeddings; this model uses position_embedding_type={position}")
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise UserError(f"{NAME} serves encoders; this model is configured as a decoder")


def layers_of(model):
    """The transformer layers (a ModuleList) of a supported model, any head (``families.Family.layers_module``)."""
    return model.base_model.get_submodule(ALL_FAMILIES[model.config.model_type].layers_module)


def _is_distilbert(layer) -> bool:
    return hasattr(layer, "sa_layer_norm")


# -- the computation -------------------------------------------------------------------

def first_query_bias(mask, dtype):
    """The additive attention bias of the first query, [B, 1|H, 1, S], from any mask form a
    layer receives (None: nothing masked)."""
    import torch

    if mask is None:
        return None
    if mask.dim() == 2:  # [B, S] keep-mask: 1 (or True) for tokens, 0 for padding
        keep = mask if mask.dtype == torch.bool else mask != 0
        row = keep[:, None, None, :]
    elif mask.dim() == 4:  # [B, 1|H, 1|S, S]: additive, or a boolean keep-mask (SDPA)
        row = mask[:, :, :1, :]
        if row.dtype != torch.bool:
            return row if row.dtype == dtype else row.to(dtype)
    else:
        raise ValueError(f"{NAME}: unexpected attention mask of shape {tuple(mask.shape)}")
    zero = torch.zeros((), dtype=dtype, device=row.device)
    return torch.where(row, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=row.device))


def _heads(linear, heads: int) -> tuple[int, int]:
    size, rest = divmod(linear.out_features, heads)
    if rest or size == 0:
        raise ValueError(f"{NAME}: {linear.out_features} projection outputs do not split into {heads} heads")
    return heads, size


def _attend(q, k, v, heads: int, size: int, bias, dropout=None, head_mask=None):
    """Scaled dot-product attention of one query row per head against every key."""
    import torch

    def split(x):
        return x.view(x.shape[0], -1, heads, size).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(size)  # [B, H, 1, S]
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    if dropout is not None:
        probs = dropout(probs)
    if head_mask is not None:
        probs = probs * head_mask
    context = torch.matmul(probs, v).transpose(1, 2)  # [B, 1, H, d]
    return context.reshape(context.shape[0], -1, heads * size), probs


def _bert_self_attention(self, hidden_states, attention_mask=None, head_mask=None, *args, **kwargs):
    """BertSelfAttention (and its SDPA variant) for the first query: [B, S, D] -> [B, 1, D]."""
    if kwargs.get("past_key_values") is not None:
        raise ValueError(f"{NAME}: cross-attention and caches are not rewritten")
    heads, size = _heads(self.query, self.num_attention_heads)
    bias = first_query_bias(attention_mask, hidden_states.dtype)
    return _attend(self.query(hidden_states[:, :1]), self.key(hidden_states), self.value(hidden_states), heads, size, bias,
                   self.dropout, head_mask)


def _bert_attention(self, hidden_states, attention_mask=None, head_mask=None, *args, **kwargs):
    """BertAttention for the first token: self-attention, then dense + LayerNorm on the first
    token's residual."""
    context, probs = self.self(hidden_states, attention_mask, head_mask, **kwargs)
    return self.output(context, hidden_states[:, :1]), probs


def _bert_layer(self, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None, *args,
                output_attentions=False, **kwargs):
    """BertLayer (RoBERTa, XLM-R, CamemBERT, ELECTRA: the same layout) for the first token.
    Each submodule is called through its parent, as the original does, so the export's
    node names (``layer.N/attention/self/query/MatMul``) are the original's."""
    if encoder_hidden_states is not None:
        raise ValueError(f"{NAME}: cross-attention is not rewritten")
    attention_output, probs = self.attention(hidden_states, attention_mask, head_mask, **kwargs)
    layer_output = self.output(self.intermediate(attention_output), attention_output)
    return (layer_output, probs) if output_attentions else (layer_output,)


def _distilbert_attention(self, query, key, value, mask, head_mask=None, output_attentions=False):
    """MultiHeadSelfAttention (and its SDPA variant) for the first query; out_lin included."""
    heads, size = _heads(self.q_lin, self.n_heads)
    bias = first_query_bias(mask, query.dtype)
    context, probs = _attend(self.q_lin(query[:, :1]), self.k_lin(key), self.v_lin(value), heads, size, bias,
                             self.dropout, head_mask)
    context = self.out_lin(context)
    return (context, probs) if output_attentions else (context,)


def _distilbert_block(self, x, attn_mask=None, head_mask=None, output_attentions=False, **kwargs):
    """DistilBERT's TransformerBlock for the first token."""
    out = self.attention(query=x, key=x, value=x, mask=attn_mask, head_mask=head_mask, output_attentions=output_attentions)
    sa_output = self.sa_layer_norm(out[0] + x[:, :1])
    ffn_output = self.output_layer_norm(self.ffn(sa_output) + sa_output)
    return (out[1], ffn_output) if output_attentions else (ffn_output,)


def _patches(layer) -> list[tuple[object, object]]:
    if _is_distilbert(layer):
        return [(layer, _distilbert_block), (layer.attention, _distilbert_attention)]
    return [(layer, _bert_layer), (layer.attention, _bert_attention), (layer.attention.self, _bert_self_attention)]


def rewrite(model):
    """Make ``model``'s last layer compute for the first token only (in place; ``restore``
    undoes it). Returns the model."""
    layer = layers_of(model)[-1]
    for module, forward in _patches(layer):
        module.forward = types.MethodType(forward, module)
    return model


def restore(model):
    layer = layers_of(model)[-1]
    for module, _ in _patches(layer):
        module.__dict__.pop("forward", None)
    return model


def is_rewritten(model) -> bool:
    return "forward" in layers_of(model)[-1].__dict__


@contextmanager
def first_token_only(model):
    """``model`` with its last layer rewritten, restored on exit."""
    rewrite(model)
    try:
        yield model
    finally:
        restore(model)


def max_logit_difference(model, feeds: dict) -> float:
    """Largest |logit difference| between ``model`` as is and rewritten, on numpy ``feeds``."""
    import torch

    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.inference_mode():
        plain = model(**inputs).logits
        with first_token_only(model):
            skipped = model(**inputs).logits
    return float((plain - skipped).abs().max())


# -- the pass --------------------------------------------------------------------------

@dataclass
class FirstTokenSkipConfig:
    check_texts: int = option(8, "calibration sentences (one padded, mixed-length batch) on which the rewritten PyTorch "
                                 "model must match the original before it is exported (0: no check)", min=0)
    tolerance: float = option(1e-4, "largest |logit difference| that check allows", min=0, min_open=True)


class FirstTokenSkip(Pass):
    """Exact compute skipping: the last layer computes attention output and FFN for the first token only."""

    name = NAME
    Config = FirstTokenSkipConfig
    capability = Capability("any", "fp32")
    first_only = True  # it re-exports the PyTorch model: it must be a profile's first pass

    @classmethod
    def check_checkpoint(cls, family: str, task: str, config: dict) -> None:
        check_supported(family, task, config)

    def run(self, model: ModelFile, config: FirstTokenSkipConfig, ctx: PassContext) -> ModelFile:
        from bertexport.building.export import export_onnx

        profile = ctx.profile
        if profile is not None and profile.passes and profile.passes[0].type != NAME:
            raise UserError(f"profile {profile.name}: {NAME} re-exports the PyTorch model, so it must be the first pass")
        check_supported(ctx.family, ctx.task, ctx.model_config)
        if ctx.torch_model is None or ctx.checkpoint is None:
            raise RuntimeError(f"{NAME} needs the PyTorch model and its checkpoint")
        torch_model = ctx.torch_model
        layers = layers_of(torch_model)
        notes = {"first_token_skip": True, "layer": len(layers) - 1, "layers": len(layers), "variant": f"{NAME}/v{VERSION}"}
        if config.check_texts:
            feeds = ctx.encode(ctx.calibration_texts()[: config.check_texts], padding="longest")
            diff = max_logit_difference(torch_model, feeds)
            notes["check"] = {"texts": int(feeds["input_ids"].shape[0]), "tokens": int(feeds["input_ids"].shape[1]),
                              "max_abs_logit_diff": diff, "tolerance": config.tolerance}
            ctx.log(f"{NAME}: rewritten PyTorch model vs original, max |logit diff| {diff:.2g} on "
                    f"{notes['check']['texts']} sentences")
            if not diff <= config.tolerance:
                raise UserError(f"{NAME} is not exact on this model: max |logit difference| {diff:.3g} > tolerance "
                                f"{config.tolerance} on calibration sentences")
        opset = getattr(profile, "opset", 18)
        with first_token_only(torch_model):
            exported = export_onnx(ctx.checkpoint, torch_model, opset, variant=notes["variant"])
        ctx.log(f"{NAME}: layer {notes['layer']} computes queries, attention output and FFN for the first token only"
                + (" (export reused from cache)" if exported.cached else ""))
        return ModelFile(exported.path, "onnx", notes=notes | {"export_cached": exported.cached})
