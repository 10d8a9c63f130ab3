"""ONNX graph queries, in one place: the nodes that multiply by a weight (what int8
quantizes), the nodes that break BERT accuracy when quantized, the nodes an fp16 engine
must keep in fp32, and the named regions of a family's graph (``families.Family.regions``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Graph:
    """An ONNX graph's nodes with producer/consumer maps (weights are not loaded)."""

    nodes: list
    initializers: set[str]
    producer: dict[str, object]
    consumers: dict[str, list]

    @classmethod
    def load(cls, path: str | Path) -> "Graph":
        import onnx

        g = onnx.load(str(path), load_external_data=False).graph
        producer = {o: n for n in g.node for o in n.output}
        consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        return cls(list(g.node), {i.name for i in g.initializer}, producer, consumers)

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def next_ops(self, node) -> list[str]:
        return [c.op_type for o in node.output for c in self.consumers.get(o, [])]

    def prev_ops(self, node) -> list[str]:
        return [self.producer[i].op_type for i in node.input if i in self.producer]


def weight_nodes(path, op_types=("MatMul",)) -> list[str]:
    """Nodes of the given op types that multiply by a constant weight (what int8 quantizes)."""
    g = Graph.load(path)
    return [n.name for n in g.nodes if n.op_type in op_types and any(x in g.initializers for x in n.input)]


def sensitive_nodes(path) -> list[str]:
    """Nodes that break BERT accuracy when quantized (optimum#151's exclusions): LayerNorm,
    GELU (Erf and its Mul/Add), Softmax and the mask Add before it, the embedding Adds after
    Gather, and residual Adds feeding LayerNorm."""
    g = Graph.load(path)
    always = {"LayerNormalization", "SkipLayerNormalization", "Erf", "Gelu", "BiasGelu", "FastGelu", "Softmax"}
    names = []
    for n in g.nodes:
        nexts, prevs = g.next_ops(n), g.prev_ops(n)
        if n.op_type in always:
            names.append(n.name)
        elif n.op_type == "Add" and ({"Softmax", "LayerNormalization", "Add"} & set(nexts) or "Gather" in prevs):
            names.append(n.name)
        elif n.op_type in ("Mul", "Add", "Div") and ("Erf" in prevs or "Erf" in nexts):
            names.append(n.name)
    return names


_ALWAYS_FP32 = {"LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf"}


def fp32_node_names(path) -> list[str]:
    """ONNX nodes an fp16 engine must keep in fp32: LayerNorm (and its decomposed reduce/
    pow/sqrt), Softmax, GELU's Erf, and the attention-mask arithmetic — every node on the
    path from the attention_mask input to the node that feeds Softmax (the mask Add, or
    Where for masked_fill), whose large negative fill overflows fp16 (TensorRT#2564,
    #2466, transformers#9700)."""
    g = Graph.load(path)
    keep = [n.name for n in g.nodes if n.op_type in _ALWAYS_FP32]
    frontier, seen = ["attention_mask"], set()
    while frontier:  # forward walk from attention_mask until the Softmax-feeding node (inclusive)
        t = frontier.pop()
        for n in g.consumers.get(t, []):
            if n.name in seen:
                continue
            seen.add(n.name)
            keep.append(n.name)
            if "Softmax" not in g.next_ops(n) and n.op_type not in ("MatMul", "Gemm"):
                frontier.extend(n.output)
    return sorted(set(keep))


def region_of(name: str, regions: dict[str, str]) -> tuple[str, int | None] | None:
    """(region, layer index) of a node name under a family's region patterns, or None."""
    for region, pattern in regions.items():
        m = re.fullmatch(pattern, name)
        if m:
            layer = m.groupdict().get("layer")
            return region, int(layer) if layer is not None else None
    return None


def regions_in(names: list[str], regions: dict[str, str]) -> dict[tuple[str, int | None], list[str]]:
    """The graph's weight nodes grouped by (region, layer)."""
    out: dict[tuple[str, int | None], list[str]] = {}
    for n in names:
        r = region_of(n, regions)
        if r is not None:
            out.setdefault(r, []).append(n)
    return out


# Fused ops that hold one region's weights: ORT's transformer optimizer folds a layer's
# Q/K/V projections into one Attention node (weights concatenated), so "attention_qkv@3"
# is that node in a fused graph.
_FUSED_QKV = ("Attention", "MultiHeadAttention", "QAttention")


def node_regions(path, regions: dict[str, str]) -> dict[str, tuple[str, int | None]]:
    """(region, layer) of every weight node of a graph, fused or not: MatMul/Gemm nodes by
    their names under the family's patterns; a fused Attention node is the ``attention_qkv``
    of the layer whose attention output projection consumes its output (its own name,
    ``Attention_N``, counts fusions, not layers)."""
    g = Graph.load(path)
    out: dict[str, tuple[str, int | None]] = {}
    for n in g.nodes:
        r = region_of(n.name, regions)
        if r is not None:
            out[n.name] = r
    for n in g.nodes:
        if n.op_type not in _FUSED_QKV:
            continue
        frontier, seen = list(n.output), set()
        while frontier:  # forward to the first node that names a region (the attention output MatMul)
            consumers = [c for t in frontier for c in g.consumers.get(t, []) if c.name not in seen]
            seen.update(c.name for c in consumers)
            owner = next((out[c.name] for c in consumers if out.get(c.name, ("",))[0] == "attention_output"), None)
            if owner is not None:
                out[n.name] = ("attention_qkv", owner[1])
                break
            frontier = [o for c in consumers if c.op_type not in ("MatMul", "Gemm", *_FUSED_QKV) for o in c.output]
    return out


def region_nodes(path, specs: list[str], regions: dict[str, str]) -> list[str]:
    """Node names of the named regions ``specs`` (``ffn_output``, ``attention_qkv@3``) in
    this graph, fused or not (see ``node_regions``)."""
    if not specs:
        return []
    from bertexport.core.families import check_region_spec

    wanted = set()
    for spec in specs:
        check_region_spec(spec)
        region, _, layer = spec.partition("@")
        wanted.add((region, int(layer) if layer else None))
    return [name for name, (region, layer) in node_regions(path, regions).items()
            if (region, layer) in wanted or (region, None) in wanted]
