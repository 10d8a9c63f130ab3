"""int8-embeddings: the word-embedding table stored in int8, one scale per row.

The word-embedding table is most of a small model's bytes (all-MiniLM-L6-v2: 30522 x 384
floats, 46.9 MB of the 90.4 MB fp32 export, and of the 58.7 MB ort-int8 artifact, whose
dynamic int8 leaves Gathers float). Here each row (one token's vector) gets its own
symmetric scale, max|row| / 127, so a token's error is at most half a step of its own
range (ORT's own QEmbedLayerNormalization uses one uint8 scale for the whole table):

    Gather(table, ids)  ->  Mul(Cast(Gather(table_int8, ids), float), Gather(scales, ids))

Only the rows a text uses are dequantized, per call. The int8 Gather keeps the original
node's name. ONNX in, ONNX out: it goes before ``ort-dynamic-quantize`` (which leaves the
Gather alone) and before ``openvino-convert`` (OpenVINO keeps the int8 constant in the IR
and converts the gathered rows), and before ``ort-transformers-optimize`` (whose
EmbedLayerNormalization fusion needs a float Gather: the embeddings then stay unfused; the
other fusions happen). Behind that optimizer the table is an input of the fused
EmbedLayerNormalization, which takes float tables only: refused, with the alternative (ORT's
own QEmbedLayerNormalization: ``op_types`` of ``ort-dynamic-quantize``).

Measured on all-MiniLM-L6-v2 (feature extraction; min cosine to PyTorch over the 48
validation sentences, real lengths / padded batch): alone, 90.4 -> 55.3 MB at 0.99992; with
dynamic int8 (no fallback) 58.7 -> 23.6 MB, 0.959/0.959 -> 0.958/0.949 — the ort-int8 gate
(0.95) then fails on one padded sentence, so no built-in profile ships the pair; ORT's
QEmbedLayerNormalization on the fused graph: 22.8 MB, 0.964/0.957. OpenVINO fp32 IR
90.5 -> 55.4 MB. NNCF's nncf-quantize already stores the word table int8 with per-row
scales (openvino-int8: 33.9 MB either way), so in front of it this pass saves nothing.

If something else reads the table too (a tied output projection), it reads a
DequantizeLinear of the int8 table instead, so the float copy is not kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bertexport.core.errors import UserError
from bertexport.core.options import option
from bertexport.building.passes.base import Capability, ModelFile, Pass, PassContext

NAME = "int8-embeddings"
# ops between input_ids and the embedding Gather's indices that keep the ids' values
_ID_PRESERVING = {"Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_FUSED = {"EmbedLayerNormalization", "QEmbedLayerNormalization"}
_FUSED_ALTERNATIVE = ("the fused EmbedLayerNormalization takes a float table; put int8-embeddings before "
                      "ort-transformers-optimize, or quantize the fused op with ort-dynamic-quantize "
                      "op_types = [..., \"EmbedLayerNormalization\"] (ORT's QEmbedLayerNormalization: one uint8 scale per table)")
_EXTERNAL_ABOVE = 1_800_000_000  # protobuf's 2 GB limit, with room for the graph


@dataclass
class Int8EmbeddingsConfig:
    ids_input: str = option("input_ids", "graph input whose Gather (the largest float table it reads) is the word-embedding table")


def _files(path: Path) -> list[Path]:
    """The model file and its external-data files, if any."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    return [path] + [path.parent / loc for loc in sorted(locations)]


def find_word_embedding(graph, ids_input: str = "input_ids"):
    """The Gather fed by ``ids_input`` whose data is the largest float initializer, and that
    initializer; (None, None) when there is none. UserError when the table sits in a fused
    EmbedLayerNormalization."""
    from onnx import TensorProto

    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    reached, frontier, found = {ids_input}, [ids_input], []
    while frontier:
        name = frontier.pop()
        for n in consumers.get(name, []):
            if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == name and n.input[0] in inits:
                t = inits[n.input[0]]
                if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and len(t.dims) == 2:
                    found.append((t.dims[0] * t.dims[1], n, t))
            elif n.op_type in _FUSED and n.input and n.input[0] == name:
                raise UserError(f"{NAME}: the word embeddings are fused into {n.op_type} ({n.name}): {_FUSED_ALTERNATIVE}")
            elif n.op_type in _ID_PRESERVING:
                for o in n.output:
                    if o not in reached:
                        reached.add(o)
                        frontier.append(o)
    if not found:
        return None, None
    _, node, table = max(found, key=lambda f: f[0])
    return node, table


def quantize_rows(table):
    """Symmetric int8 per row: (int8 table, float32 scales [rows], largest |error|)."""
    import numpy as np

    w = table.astype(np.float32)
    scale = np.abs(w).max(axis=1) / 127.0
    q = np.clip(np.rint(w / np.where(scale > 0, scale, 1.0)[:, None]), -127, 127).astype(np.int8)
    err = float(np.abs(q.astype(np.float32) * scale[:, None] - w).max()) if w.size else 0.0
    return q, scale.astype(np.float32), err


def rewrite(model, ids_input: str = "input_ids") -> dict:
    """Rewrite ``model`` (an onnx ModelProto) in place; returns what was done."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    if ids_input not in {i.name for i in graph.input}:
        raise UserError(f"{NAME}: the model has no input '{ids_input}' (inputs: {', '.join(i.name for i in graph.input)})")
    gather, table = find_word_embedding(graph, ids_input)
    if gather is None:
        raise UserError(f"{NAME}: no Gather reads a float embedding table with '{ids_input}': is this a BERT-family export?")
    rows, width = int(table.dims[0]), int(table.dims[1])
    weights = numpy_helper.to_array(table)
    q, scale, err = quantize_rows(weights)
    float_type = table.data_type
    scale = scale.astype(weights.dtype)
    base = table.name
    q_name, s_name = f"{base}.int8", f"{base}.row_scale"
    others = [n for n in graph.node if n is not gather and base in n.input]
    kept = [t for t in graph.initializer if t.name != base]
    del graph.initializer[:]
    graph.initializer.extend(kept + [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale[:, None], s_name)])
    ids, out = gather.input[1], gather.output[0]
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    if axis != 0:
        raise UserError(f"{NAME}: the embedding Gather {gather.name} gathers on axis {axis}, not rows")
    new_nodes = [
        helper.make_node("Gather", [q_name, ids], [f"{out}.int8"], name=gather.name, axis=0),
        helper.make_node("Cast", [f"{out}.int8"], [f"{out}.float"], name=f"{gather.name}_dequant/Cast", to=float_type),
        helper.make_node("Gather", [s_name, ids], [f"{out}.row_scale"], name=f"{gather.name}_dequant/Gather_scale", axis=0),
        helper.make_node("Mul", [f"{out}.float", f"{out}.row_scale"], [out], name=f"{gather.name}_dequant/Mul"),
    ]
    if others:  # a tied projection reads the table too: it reads the dequantized int8 table
        zero = f"{base}.zero_point"
        graph.initializer.extend([numpy_helper.from_array(scale, f"{base}.row_scale_1d"),
                                  numpy_helper.from_array(np.zeros(rows, np.int8), zero)])
        new_nodes.insert(0, helper.make_node("DequantizeLinear", [q_name, f"{base}.row_scale_1d", zero], [base],
                                             name=f"{gather.name}_dequant/DequantizeLinear", axis=0))
    at = list(graph.node).index(gather)
    nodes = list(graph.node)
    nodes[at:at + 1] = new_nodes
    del graph.node[:]
    graph.node.extend(nodes)
    return {"table": base, "gather": gather.name, "rows": rows, "width": width,
            "table_bytes_before": int(weights.nbytes), "table_bytes_after": int(q.nbytes + scale.nbytes),
            "max_abs_error": err, "max_abs_weight": float(np.abs(weights).max()),
            "shared_with": [n.name for n in others]}


class Int8Embeddings(Pass):
    """The word-embedding table stored int8 with one scale per row (dequantized per gathered row)."""

    name = NAME
    Config = Int8EmbeddingsConfig
    capability = Capability("any", "int8-weights")
    not_after = {"ort-transformers-optimize": _FUSED_ALTERNATIVE}

    def run(self, model: ModelFile, config: Int8EmbeddingsConfig, ctx: PassContext) -> ModelFile:
        import onnx

        before = sum(f.stat().st_size for f in _files(model.path))
        m = onnx.load(str(model.path))
        notes = rewrite(m, config.ids_input)
        out = ctx.workdir / "model.int8emb.onnx"
        if m.ByteSize() > _EXTERNAL_ABOVE:
            onnx.save_model(m, str(out), save_as_external_data=True, location=out.name + ".data")
        else:
            onnx.save_model(m, str(out))
        files = _files(out)
        after = sum(f.stat().st_size for f in files)
        notes |= {"bytes_before": before, "bytes_after": after}
        ctx.log(f"{NAME}: {notes['table']} ({notes['rows']} x {notes['width']}) int8 per row: model {before / 1e6:.1f} MB -> "
                f"{after / 1e6:.1f} MB, largest weight error {notes['max_abs_error']:.2g}")
        return ModelFile(out, "onnx", files, notes=notes)
