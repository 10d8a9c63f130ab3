"""Student construction: shapes, importance scores, width pruning and layer choice.

A student shape is ``L<layers>-H<hidden>-A<heads>-F<ffn>``. Heads keep the teacher's head
size, so a stock config (hidden = heads x head size) prunes heads and hidden dimensions
together. Width pruning slices weights physically (no ``prune_heads``/``head_mask``, which
transformers 5 removed): the result is a model of the teacher's class with a *stock*
config, saved and reloaded like any checkpoint, exported and converted like any model.

Importance is a first-order Taylor score (Michel et al. 2019, FastFormers, CoFi's hidden
mask): gates of ones are multiplied in by forward hooks, one per head on the attention
context, one per FFN neuron on the activation, one per hidden dimension on every
LayerNorm output; L is the loss against the teacher's outputs. The score is the
first-order estimate of the loss increase when the gate closes, -dL/d gate summed over
batches ("signed"; |dL/d gate| per batch, Michel et al.'s form, with ``signed=False``).
Signed is the default because it was measured better on a layer-dropped student, which is
not at a loss minimum: on the tiny trained keyword model (2 layers -> layer 1 only, FFN
64 -> 16) signed kept agreement 1.00 (KL 1e-4) where |grad| kept 0.92 (KL 0.15, worse
than reversing its own ranking); on the full-depth teacher both agree. Head scores are
L2-normalised per layer.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass

import numpy as np

from bertexport.core.errors import UserError
from bertexport.core.families import FAMILIES, Width, get_family, layer_count as _layer_count

_SHAPE = re.compile(r"^(?:L(?P<L>\d+))?(?:-?H(?P<H>\d+))?(?:-?A(?P<A>\d+))?(?:-?F(?P<F>\d+))?$", re.IGNORECASE)


@dataclass(frozen=True)
class StudentShape:
    layers: int
    hidden: int
    heads: int
    ffn: int

    @property
    def name(self) -> str:
        return f"L{self.layers}-H{self.hidden}-A{self.heads}-F{self.ffn}"

    def to_dict(self) -> dict:
        return asdict(self) | {"name": self.name}


# the families whose heads, FFN neurons and hidden size can be sliced, and where (families.Width)
WIDTH_FAMILIES: dict[str, Width] = {name: f.width for name, f in FAMILIES.items() if f.width is not None}


def width_prunable(family: str) -> bool:
    """Whether heads, FFN neurons and hidden dimensions of ``family`` can be sliced
    (ELECTRA only when its embedding size equals its hidden size: see ``check_shape``)."""
    return family in WIDTH_FAMILIES


def _cfg_get(config, keys, default=None):
    d = config if isinstance(config, dict) else config.to_dict()
    return next((d[k] for k in keys if k in d and d[k] is not None), default)


def teacher_shape(config) -> StudentShape:
    """The shape of a checkpoint's config (a transformers config or its dict)."""
    model_type = _cfg_get(config, ("model_type",))
    fam = get_family(model_type)
    values = [_cfg_get(config, keys) for keys in (fam.layers_key, fam.hidden_key, fam.heads_key, fam.ffn_key)]
    if any(v is None for v in values):
        raise UserError(f"cannot read layers/hidden/heads/FFN size from the {model_type} config")
    return StudentShape(*(int(v) for v in values))


def head_size(teacher: StudentShape) -> int:
    return teacher.hidden // teacher.heads


def parse_shape(text: str, teacher: StudentShape) -> StudentShape:
    """``L3``, ``L3-H256``, ``L3-H256-F1024``, ``H256``, ``L3-F768`` (or a full name with
    ``A``): missing parts are the teacher's; heads = hidden / the teacher's head size."""
    m = _SHAPE.match((text or "").strip())
    if not text or not text.strip() or not m or not any(m.groupdict().values()):
        raise UserError(f"student shape {text!r} is not like L3, L3-H256 or L3-H256-F1024 "
                        f"(L layers, H hidden size, F FFN size; the teacher is {teacher.name})")
    layers = int(m["L"]) if m["L"] else teacher.layers
    hidden = int(m["H"]) if m["H"] else teacher.hidden
    ffn = int(m["F"]) if m["F"] else teacher.ffn
    hs = head_size(teacher)
    if hidden % hs:
        raise UserError(f"student shape {text!r}: hidden size {hidden} is not a multiple of the teacher's head size "
                        f"{hs} (teacher {teacher.name}); try H{max(hs, hidden // hs * hs)}")
    heads = hidden // hs
    if m["A"] and int(m["A"]) != heads:
        raise UserError(f"student shape {text!r}: {m['A']} heads do not fit hidden size {hidden} "
                        f"with the teacher's head size {hs} (that is {heads} heads)")
    return StudentShape(layers, hidden, heads, ffn)


def check_shape(shape: StudentShape, teacher: StudentShape, family: str, config=None) -> None:
    """Refuse a shape that is not a smaller stock model of ``teacher`` (``config``, when
    given, lets ELECTRA's embedding size be checked)."""
    hs = head_size(teacher)
    if min(shape.layers, shape.hidden, shape.heads, shape.ffn) < 1:
        raise UserError(f"student shape {shape.name}: every size must be >= 1")
    if shape.hidden != shape.heads * hs:
        raise UserError(f"student shape {shape.name}: hidden size must be heads x the teacher's head size {hs}")
    parts = {"layers": (shape.layers, teacher.layers), "hidden": (shape.hidden, teacher.hidden),
             "heads": (shape.heads, teacher.heads), "ffn": (shape.ffn, teacher.ffn)}
    larger = [k for k, (s, t) in parts.items() if s > t]
    if larger:
        raise UserError(f"student shape {shape.name} is larger than the teacher {teacher.name} in {', '.join(larger)}")
    if shape == teacher:
        raise UserError(f"student shape {shape.name} is the teacher's own shape: nothing to compress")
    if (shape.hidden, shape.ffn) != (teacher.hidden, teacher.ffn):
        _check_width_family(family, config)


def _check_width_family(family: str, config=None) -> None:
    if not width_prunable(family):
        raise UserError(f"width pruning (hidden/heads/FFN) supports {', '.join(WIDTH_FAMILIES)}, not {family}; "
                        "a layer-dropped student (L only, e.g. L3) works for every family")
    fam = get_family(family)
    if config is None:
        return
    hidden = _cfg_get(config, fam.hidden_key)
    for key in fam.width.extra_hidden_keys:  # sizes that follow the hidden size must equal it (ELECTRA's embeddings)
        size = _cfg_get(config, (key,))
        if size is not None and size != hidden:
            raise UserError(f"width pruning of {fam.display} needs {key} == {fam.hidden_key[0]} (this one: {size} vs "
                            f"{hidden}); a layer-dropped student (L only) works")


def student_config(teacher_config, shape: StudentShape):
    """The teacher's config with the student's sizes: a stock config, nothing pruned."""
    fam = get_family(teacher_config.model_type)
    cfg = copy.deepcopy(teacher_config)
    sizes = [(fam.layers_key, shape.layers), (fam.hidden_key, shape.hidden), (fam.heads_key, shape.heads),
             (fam.ffn_key, shape.ffn)]
    if fam.width:
        sizes += [((k,), shape.hidden) for k in fam.width.extra_hidden_keys]
    for keys, value in sizes:
        key = next((k for k in keys if k in cfg.to_dict()), None)
        if key is None:
            raise UserError(f"cannot set {'/'.join(keys)} on a {teacher_config.model_type} config")
        setattr(cfg, key, value)
    if getattr(cfg, "pruned_heads", None):
        cfg.pruned_heads = {}
    return cfg


def _model_class(config):
    import transformers

    for arch in config.architectures or ():
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    return None


def random_student(teacher_config, shape: StudentShape):
    """A random-init model of the teacher's class with the student's stock config (what a
    latency cost model measures: the compute of a shape, not its accuracy)."""
    import transformers

    cfg = student_config(teacher_config, shape)
    cls = _model_class(teacher_config)
    model = cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
    return model.eval()


# ------------------------------------------------------------------ model anatomy

def _layers(model):
    """The transformer layers (ModuleList) and their module-name prefix (``families.Family.layers_module``)."""
    where = get_family(model.config.model_type).layers_module
    for name, module in model.named_modules():
        if where and (name == where or name.endswith(f".{where}")):
            return module, name
    raise UserError(f"cannot find the transformer layers of {type(model).__name__}")


def _width(model) -> Width:
    family = model.config.model_type
    _check_width_family(family, model.config)
    return WIDTH_FAMILIES[family]


def _layer_norms(model, hidden: int):
    import torch

    return [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm) and tuple(m.normalized_shape) == (hidden,)]


# ------------------------------------------------------------------ importance

@dataclass
class Importance:
    """Scores, higher = keep: heads[layer][head], ffn[layer][neuron], hidden[dim]."""

    heads: np.ndarray
    ffn: np.ndarray
    hidden: np.ndarray
    method: str = "taylor"

    def to_dict(self) -> dict:
        return {"heads": self.heads.tolist(), "ffn": self.ffn.tolist(), "hidden": self.hidden.tolist(), "method": self.method}


def distillation_loss(out, teacher: dict, batch, task: str):
    """The student's loss against the teacher's cached outputs (``training_data.TeacherOutputs``
    format): KL on logits (real tokens only for token tasks), on start/end for QA, masked
    MSE of the last hidden state for embeddings."""
    import torch

    mask = batch["inputs"]["attention_mask"].float()
    if task == "feature-extraction":
        diff = ((out.last_hidden_state - torch.from_numpy(teacher["hidden"])) ** 2).mean(-1)
        return (diff * mask).sum() / mask.sum()
    return sum(_kl(s, torch.from_numpy(t), mask, task) for s, t in _logit_pairs(out, teacher, task))


def _logit_pairs(out, teacher, task):
    if task == "question-answering":
        return [(out.start_logits, teacher["start"]), (out.end_logits, teacher["end"])]
    return [(out.logits, teacher["logits"])]


def _token_mean(x, mask, task):
    if x.dim() == 2 and task == "token-classification":
        return (x * mask).sum() / mask.sum()
    return x.mean()


def _kl(s, t, mask, task):
    import torch.nn.functional as F

    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    return _token_mean(kl, mask, task)


def _scoring_loss(out, teacher: dict, batch, task: str, seed: int):
    """``distillation_loss`` plus a term whose gradient does not vanish when the scored
    model *is* the teacher (then KL and MSE sit at their minimum, every gradient is 0):
    cross-entropy on the teacher's argmax (Michel et al.'s loss with the teacher's labels
    standing in for gold labels); for embeddings a random projection of the output
    (E|d<h,r>/dg| ~ ||dh/dg||: how far the output moves when the gate closes)."""
    import torch
    import torch.nn.functional as F

    loss = distillation_loss(out, teacher, batch, task)
    mask = batch["inputs"]["attention_mask"].float()
    if task == "feature-extraction":
        h = out.last_hidden_state
        r = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed))
        return loss + ((h * r).sum(-1) * mask).sum() / mask.sum()
    for s, t in _logit_pairs(out, teacher, task):
        hard = torch.from_numpy(t).argmax(-1)
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), hard.reshape(-1), reduction="none").reshape(hard.shape)
        loss = loss + _token_mean(ce, mask, task)
    return loss


def unit_gate_gradients(model, items, loss_of):
    """Per item, the gradients of ``loss_of(i, item)`` (which runs ``model``) with respect to
    gates of ones on every head (before the attention output), FFN neuron (before the FFN
    output) and hidden dimension (after every LayerNorm) of ``model``: a generator of
    (heads [layers, heads], ffn [layers, ffn], hidden [hidden]) tensors. The model runs in
    eval mode; its hooks are removed and its mode restored when the generator ends."""
    import torch

    width = _width(model)
    layers, _ = _layers(model)
    shape = teacher_shape(model.config)
    hs = head_size(shape)
    gates = (torch.ones(len(layers), shape.heads, requires_grad=True),
             torch.ones(len(layers), shape.ffn, requires_grad=True),
             torch.ones(shape.hidden, requires_grad=True))
    head_gate, ffn_gate, hidden_gate = gates
    handles = []

    def gate_heads(i):
        def hook(module, args):
            gated = (args[0].unflatten(-1, (shape.heads, hs)) * head_gate[i][:, None]).flatten(-2)
            return (gated,) + tuple(args[1:])
        return hook

    def gate_ffn(i):
        return lambda module, args: (args[0] * ffn_gate[i],) + tuple(args[1:])

    was_training = model.training
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.get_submodule(width.attn_out).register_forward_pre_hook(gate_heads(i)))
            handles.append(layer.get_submodule(width.ffn_out).register_forward_pre_hook(gate_ffn(i)))
        for ln in _layer_norms(model, shape.hidden):
            handles.append(ln.register_forward_hook(lambda module, args, output: output * hidden_gate))
        model.eval()
        for i, item in enumerate(items):
            yield torch.autograd.grad(loss_of(i, item), gates)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def score_importance(model, batches, task: str, teacher_outputs, signed: bool = True) -> Importance:
    """First-order Taylor importance of every head, FFN neuron and hidden dimension of
    ``model`` on ``batches`` (``training_data.length_batches``) against ``teacher_outputs``
    (``training_data.TeacherOutputs``). ``model`` is the teacher or a layer-dropped copy of it (better
    for a shallower student: the scores then see the layers the student keeps); the
    scores are indexed by its own layers. ``signed``: -dL/dg summed over batches (the
    predicted loss increase when the unit is removed); else |dL/dg| summed per batch."""
    import torch

    def loss_of(i, pair):
        b, t = pair
        return _scoring_loss(model(**b["inputs"]), t, b, task, seed=i)

    acc = None
    for grads in unit_gate_gradients(model, zip(batches, teacher_outputs, strict=True), loss_of):
        step = [-g if signed else g.abs() for g in grads]
        acc = step if acc is None else [a + g for a, g in zip(acc, step)]
    if acc is None:
        acc = [torch.zeros(0)] * 3
    heads = acc[0].numpy()
    heads = heads / (np.sqrt((heads ** 2).sum(-1, keepdims=True)) + 1e-20)  # L2 per layer (Michel et al.)
    return Importance(heads, acc[1].numpy(), acc[2].numpy(), "taylor-signed" if signed else "taylor-abs")


def magnitude_importance(model) -> Importance:
    """Weight-magnitude scores (no data): a head by |W_value rows| x |W_out columns|, an
    FFN neuron by |W_in row| x |W_out column|, a hidden dimension by the sum of |gamma| of
    every LayerNorm."""
    import torch

    width = _width(model)
    layers, _ = _layers(model)
    shape = teacher_shape(model.config)
    hs = head_size(shape)
    heads, ffn = [], []
    with torch.no_grad():
        for layer in layers:
            v = layer.get_submodule(width.qkv[-1]).weight.unflatten(0, (shape.heads, hs))
            o = layer.get_submodule(width.attn_out).weight.unflatten(1, (shape.heads, hs))
            heads.append((v.norm(dim=(1, 2)) * o.norm(dim=(0, 2))).numpy())
            w_in, w_out = layer.get_submodule(width.ffn_in).weight, layer.get_submodule(width.ffn_out).weight
            ffn.append((w_in.norm(dim=1) * w_out.norm(dim=0)).numpy())
        hidden = sum(ln.weight.abs() for ln in _layer_norms(model, shape.hidden)).numpy()
    return Importance(np.array(heads), np.array(ffn), hidden, "magnitude")


# ------------------------------------------------------------------ slicing

def _top(scores, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, in their original order (ties: lower index)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return sorted(int(i) for i in order[:k])


def _hidden_dims(model) -> dict[str, list[int]]:
    """For every state-dict key, the dimensions that follow the hidden size: found by
    building (on the meta device, no memory) the same class with one more head's worth of
    hidden size and seeing which dimensions change."""
    import torch

    shape = teacher_shape(model.config)
    probe_shape = StudentShape(shape.layers, shape.hidden + head_size(shape), shape.heads + 1, shape.ffn)
    with torch.device("meta"):
        probe = type(model)(student_config(model.config, probe_shape))
    probe_state = probe.state_dict()
    dims = {}
    for key, value in model.state_dict().items():
        other = probe_state[key]
        dims[key] = [d for d in range(value.dim()) if value.shape[d] != other.shape[d]]
    return dims


def slice_width(model, hidden: list[int], heads: list[list[int]], ffn: list[list[int]]):
    """A new model of ``model``'s class with a stock config keeping hidden dimensions
    ``hidden``, per layer the heads ``heads[i]`` and FFN neurons ``ffn[i]`` (indices in
    ``model``; any order: the student's dimensions follow the order given)."""
    import torch

    width = _width(model)
    shape = teacher_shape(model.config)
    hs = head_size(shape)
    layers, prefix = _layers(model)
    n = len(layers)
    if len(heads) != n or len(ffn) != n:
        raise ValueError(f"heads/ffn indices must be given for all {n} layers")
    if len({len(h) for h in heads}) != 1 or len({len(f) for f in ffn}) != 1:
        raise ValueError("a stock config keeps the same number of heads and FFN neurons in every layer")
    new_shape = StudentShape(n, len(hidden), len(heads[0]), len(ffn[0]))
    if new_shape.hidden != new_shape.heads * hs:
        raise ValueError(f"{new_shape.hidden} hidden dimensions do not fit {new_shape.heads} heads of size {hs}")
    hidden_dims = _hidden_dims(model)
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)\.(weight|bias)$")
    t_hidden = torch.tensor(hidden)
    head_rows = [torch.tensor([h * hs + j for h in hh for j in range(hs)]) for hh in heads]
    ffn_rows = [torch.tensor(f) for f in ffn]
    state = {}
    for key, value in model.state_dict().items():
        index = {d: t_hidden for d in hidden_dims[key]}
        m = layer_key.match(key)
        if m:
            i, module, kind = int(m.group(1)), m.group(2), m.group(3)
            if module in width.qkv:
                index[0] = head_rows[i]
            elif module == width.attn_out and kind == "weight":
                index[1] = head_rows[i]
            elif module == width.ffn_in:
                index[0] = ffn_rows[i]
            elif module == width.ffn_out and kind == "weight":
                index[1] = ffn_rows[i]
        odd = [d for d, idx in index.items() if idx is t_hidden and value.shape[d] != shape.hidden]
        if odd:  # a size that follows the hidden size without being it: a layout this code does not know
            raise RuntimeError(f"{key}: dimension {odd[0]} follows the hidden size but is {value.shape[odd[0]]}")
        for d, idx in sorted(index.items()):
            value = value.index_select(d, idx)
        state[key] = value.clone()
    student = type(model)(student_config(model.config, new_shape))
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"sliced weights do not match the stock student: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if hasattr(student, "tie_weights"):
        student.tie_weights()
    return student.eval()


def _importance_for(importance: Importance, keep: list[int], n_teacher: int) -> Importance:
    """``importance`` indexed by the student's layers (it may be scored on the teacher, or
    on the layer-dropped student)."""
    n = len(importance.heads)
    if n == len(keep):
        return importance
    if n == n_teacher:
        return Importance(importance.heads[keep], importance.ffn[keep], importance.hidden, importance.method)
    raise ValueError(f"importance has {n} layers: neither the teacher's {n_teacher} nor the student's {len(keep)}")


def keep_every(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, always including the last (DistilBERT keeps every 2nd)."""
    if not 1 <= student_layers < teacher_layers:
        raise UserError(f"student layers must be between 1 and {teacher_layers - 1} (teacher has {teacher_layers}), got {student_layers}")
    step = teacher_layers / student_layers
    return [int(round((i + 1) * step)) - 1 for i in range(student_layers)]


def shrink(teacher, keep: list[int]):
    """A student with the teacher's kept layers (and everything else) copied over."""
    import copy

    n = _layer_count(teacher.config)
    if sorted(set(keep)) != list(keep) or not keep or keep[0] < 0 or keep[-1] >= n:
        raise UserError(f"keep_layers must be increasing indices in 0..{n - 1}, got {keep}")
    if len(keep) >= n:
        raise UserError(f"a student with {len(keep)} layers is not smaller than the teacher ({n})")
    fam = get_family(teacher.config.model_type)
    cfg = copy.deepcopy(teacher.config)
    for k in fam.layers_key:
        if hasattr(cfg, k):
            setattr(cfg, k, len(keep))
    layer_key = re.compile(fam.layer_key)
    student = type(teacher)(cfg)
    remap = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        m = layer_key.match(key)
        if m and not fam.shared_layers:  # ALBERT shares one layer group: only the count changes
            old = int(m.group(2))
            if old not in remap:
                continue
            key = f"{m.group(1)}{remap[old]}{m.group(3)}"
        state[key] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UserError(f"could not map teacher weights onto the student: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return student


def make_student(teacher_model, shape: StudentShape, keep_layers: list[int], importance: Importance | None = None):
    """A student of ``shape``: the teacher's layers ``keep_layers``, then per layer the
    ``shape.heads`` heads and ``shape.ffn`` neurons that score highest, and the
    ``shape.hidden`` highest-scoring hidden dimensions everywhere (``importance`` None:
    weight magnitudes). A model of the teacher's class with a stock config, in eval mode."""

    family = teacher_model.config.model_type
    teacher = teacher_shape(teacher_model.config)
    n = _layer_count(teacher_model.config)
    keep = list(keep_layers)
    if len(keep) != shape.layers:
        raise UserError(f"student shape {shape.name} has {shape.layers} layers but {len(keep)} teacher layers were chosen ({keep})")
    check_shape(shape, teacher, family, teacher_model.config)
    if keep == list(range(n)):
        depth = copy.deepcopy(teacher_model)
    else:
        depth = shrink(teacher_model, keep)
    depth.eval()
    if (shape.hidden, shape.ffn) == (teacher.hidden, teacher.ffn):
        return depth
    imp = _importance_for(importance, keep, n) if importance is not None else magnitude_importance(depth)
    return slice_width(depth, _top(imp.hidden, shape.hidden), [_top(s, shape.heads) for s in imp.heads],
                       [_top(s, shape.ffn) for s in imp.ffn])


# ------------------------------------------------------------------ layer choice

def layer_candidates(n_teacher: int, n_student: int) -> dict[str, list[int]]:
    """Ways to pick ``n_student`` of ``n_teacher`` layers, duplicates dropped (first name
    wins): the lower layers (top layers dropped, Sajjad et al.), every k-th layer keeping
    the last (DistilBERT), the lower layers plus the last one (the layer the head reads)."""

    raw = {"lower": list(range(n_student)), "every-k": keep_every(n_teacher, n_student),
           "lower+last": list(range(n_student - 1)) + [n_teacher - 1]}
    out: dict[str, list[int]] = {}
    for name, keep in raw.items():
        if keep not in out.values():
            out[name] = keep
    return out


def _train(student, batches, teacher_outputs, task: str, steps: int, lr: float = 1e-4, seed: int = 0) -> None:
    """``steps`` distillation steps (AdamW, batches drawn with a fixed seed), in place."""
    import random

    import torch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    student.train()
    pick = random.Random(seed)
    for _ in range(steps):
        j = pick.randrange(len(batches))
        loss = distillation_loss(student(**batches[j]["inputs"]), teacher_outputs[j], batches[j], task)
        loss.backward()
        opt.step()
        opt.zero_grad()
    student.eval()


def measure_student(student, batches, task: str, teacher_outputs) -> dict:
    """Distillation loss of ``student`` against the teacher on ``batches`` (mean per
    text) and, for label tasks, agreement of its decisions with the teacher's."""
    import torch

    student.eval()
    losses, agree, total = [], 0, 0
    with torch.inference_mode():
        for b, t in zip(batches, teacher_outputs, strict=True):
            out = student(**b["inputs"])
            losses.append(float(distillation_loss(out, t, b, task)) * len(b["index"]))
            if task != "feature-extraction":
                s, tt = _logit_pairs(out, t, task)[0]
                same = s.argmax(-1) == torch.from_numpy(tt).argmax(-1)
                if task == "token-classification":
                    same = same[b["inputs"]["attention_mask"].bool()]
                agree += int(same.sum())
                total += int(same.numel())
    result = {"loss": sum(losses) / sum(len(b["index"]) for b in batches)}
    if total:
        result["agreement"] = agree / total
    return result


def choose_layers(teacher_model, n_student: int, batches, task: str, teacher_outputs,
                  train_steps: int = 8, lr: float = 2e-4) -> tuple[list[int], list[dict]]:
    """The teacher layers to keep, by measured effect: every candidate of
    ``layer_candidates`` is built (depth only), given ``train_steps`` distillation steps on
    the even batches, and its distillation loss against the teacher measured on the odd
    ones (one batch: on it). Returns the lowest-loss choice and the table of every
    candidate. A few steps, not zero: as built, a lower-layer student feeds its head
    representations the head never saw, which says little about how it distils (lower
    layers distil best, arXiv 2305.15032); a few steps let the head and top layer adapt."""

    n = _layer_count(teacher_model.config)
    train_b, train_o = (batches[0::2], teacher_outputs[0::2]) if len(batches) > 1 else (batches, teacher_outputs)
    eval_b, eval_o = (batches[1::2], teacher_outputs[1::2]) if len(batches) > 1 else (batches, teacher_outputs)
    table = []
    for name, keep in layer_candidates(n, n_student).items():
        student = shrink(teacher_model, keep)
        if train_steps:
            _train(student, train_b, train_o, task, train_steps, lr)
        table.append({"candidate": name, "keep": keep, **measure_student(student, eval_b, task, eval_o), "train_steps": train_steps})
    best = min(table, key=lambda r: r["loss"])
    return list(best["keep"]), table
