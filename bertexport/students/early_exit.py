"""Early exit for sequence classification (DeeBERT, FastBERT): exit heads after chosen
layers of the teacher itself, trained with the body frozen, shipped as consecutive ONNX
segments that the torch-free runtime runs in order (``shipping.runtime.EarlyExitRunner``).

The teacher runs once over the user's texts; each exit layer's first-token ([CLS]) hidden
state and the teacher's logits are cached, and one small head per exit (dense + tanh +
classifier, the pooler's shape; started from the teacher's own pooler/classifier when it has
them) is trained on them: KL divergence to the teacher's softened probabilities, plus
cross-entropy when the data has labels. The body is never trained, so the last segment
gives the teacher's answers exactly and a threshold of 1.0 gives the no-exit model.

Segments: ``embeddings + layers[0:a]`` -> (``hidden_states``, ``exit_logits``); ``layers[a:b]``
-> the same, from (``hidden_states_in``, ``attention_mask``); the last, ``layers[z:]`` + the
model's head -> ``logits``. A
segment after the first is the model with its embeddings replaced by a pass-through, so
each family's own attention-mask handling and heads are exported, not re-implemented.
A profile with passes (ort-int8, ort-fused-int8, openvino-int8, ...) compiles each fp32
segment with its own recipe (``compile_segments``: convert's pass loop, calibrated and scored
on the inputs that segment really sees); the runtime loads them with the profile's backend.

The threshold is chosen on a held-out part of the data: the smallest one (scanning down
from 1.0) at which the artifact's decisions still agree with the full model's on at least
``agreement`` of the held-out rows, measured with the compiled segments themselves (their
own int8 exit logits, so the agreement promised is the artifact's). Latency is
timed per held-out row (batch 1): at the threshold and with no row exiting (the worst case).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

import numpy as np

from bertexport.core.errors import GateFailed, UserError

MODEL_DIR = "model"
TASK = "text-classification"
MIN_TEXTS = 20  # fewer cannot both train heads and hold rows out to choose a threshold on
CALIBRATION_TEXTS = 300  # training texts a profile's passes calibrate each segment on (as convert's calib_samples)
RULE = "a row leaves at the first exit whose highest class probability is above the threshold (1.0: never; 0.0: always the first exit)"


@dataclass
class EarlyExitConfig:
    exit_layers: list[int] | None = None  # layer counts after which an exit sits (default: every 2nd)
    agreement: float = 0.99  # held-out agreement with the full model the chosen threshold keeps
    threshold: float | None = None  # a fixed threshold instead of a chosen one
    heldout_fraction: float = 0.3
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    temperature: float = 2.0
    alpha_ce: float = 0.5  # cross-entropy weight when the data has labels
    max_length: int = 128  # tokens of a training text (the artifact keeps the model's own maximum)
    seed: int = 0

    def check(self) -> "EarlyExitConfig":
        if not 0.0 < self.agreement <= 1.0:
            raise UserError(f"the exit agreement gate must be in (0, 1], not {self.agreement}")
        if self.threshold is not None:
            from bertexport.shipping.runtime import check_exit_threshold

            check_exit_threshold(self.threshold)
        if not 0.05 <= self.heldout_fraction <= 0.9:
            raise UserError("the held-out fraction must be in [0.05, 0.9]")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 8:
            raise UserError("epochs and batch size must be >= 1, max length >= 8")
        return self


def default_exit_layers(layers: int) -> list[int]:
    """Every second layer before the last (after layer 2, 4, ...); after layer 1 for a model of
    2 or 3 layers."""
    every_second = list(range(2, layers, 2))
    return every_second or ([1] if layers >= 2 else [])


def check_exit_layers(exit_layers: list[int] | None, layers: int) -> list[int]:
    chosen = default_exit_layers(layers) if not exit_layers else sorted(set(int(x) for x in exit_layers))
    if not chosen:
        raise UserError(f"a model of {layers} layer(s) has no layer to exit after: early exit needs >= 2 layers")
    bad = [x for x in chosen if not 1 <= x < layers]
    if bad:
        raise UserError(f"exit layers must be in [1, {layers - 1}] for a model of {layers} layers (an exit after the "
                        f"last layer is the model itself): {', '.join(map(str, bad))}")
    return chosen


# The passes a segment can go through: each takes one ONNX file and the inputs it sees (the
# segment's own, from ``segment_encoder``). Not here: first-token-skip and int8-embeddings
# start from the whole PyTorch model; TensorRT engines are built for the model's own inputs.
SEGMENT_PASSES = ("ort-transformers-optimize", "ort-dynamic-quantize", "ort-static-quantize", "openvino-convert",
                  "openvino-compress-weights", "nncf-quantize")
SEGMENT_BACKENDS = ("onnxruntime", "openvino")


def check_segment_profile(profile, family) -> None:
    """Refuse (``UserError``, before any model loads) a profile whose recipe cannot be applied
    to each segment: another backend, a pass that needs the whole model, a region kept float
    at a given layer (a segment numbers its layers from 0), or OpenVINO converting from PyTorch."""
    from bertexport.building.passes import get_pass

    what = (f"early exit builds segments for ONNX Runtime and OpenVINO profiles whose passes each take a segment "
            f"({', '.join(SEGMENT_PASSES)}; e.g. ort-fp32, ort-int8, ort-fused-int8, openvino-int8)")
    if profile.backend not in SEGMENT_BACKENDS:
        raise UserError(f"{what}; {profile.name} is a {profile.backend} profile")
    others = [p.type for p in profile.passes if p.type not in SEGMENT_PASSES]
    if others:
        raise UserError(f"{what}; {profile.name} has {', '.join(others)}")
    for spec in profile.passes:
        at_layer = [r for r in spec.config.get("keep_float", []) if "@" in r]
        if at_layer:
            raise UserError(f"{what}; {profile.name} keeps {', '.join(at_layer)} float, and a segment numbers its layers "
                            f"from 0: give the region without @LAYER")
        if spec.type == "openvino-convert":
            source = get_pass(spec.type).make_config(spec.config).source
            if source == "pytorch" or (source == "auto" and family.openvino_source == "pytorch"):
                raise UserError(f"{what}; OpenVINO converts {family.display} from PyTorch, and segments are converted "
                                f"from their ONNX files")


@dataclass
class EarlyExitPlan:
    convert: object  # building.convert.ConvertPlan
    config: EarlyExitConfig
    exit_layers: list[int]
    layers: int
    texts: list[str]
    labels: np.ndarray | None
    data_source: str


def plan_early_exit(model: str, target, out, data, *, config: EarlyExitConfig | None = None, text_column: str | None = None,
                    label_column: str | None = None, **convert_kw) -> EarlyExitPlan:
    """Everything checked before any model loads: the convert plan (profile, checkpoint,
    destination, gates), the task (text-classification only), the profile (one whose passes
    each take a segment: ``check_segment_profile``), the family (one list of layers), the exit
    layers and the data."""
    from bertexport.building.convert import plan_convert
    from bertexport.core.families import get_family
    from bertexport.core.textdata import label_ids, load_texts

    config = (config or EarlyExitConfig()).check()
    if data is None:
        raise UserError("early exit trains its heads on your texts: give the data file")
    plan = plan_convert(model, target, out, text_column=text_column, **convert_kw)
    ckpt, profile = plan.ckpt, plan.profile
    if ckpt.task != TASK:
        raise UserError(f"early exit serves text-classification only; {ckpt.path} is a {ckpt.task} model")
    family = get_family(ckpt.family)
    check_segment_profile(profile, family)
    if family.layers_module is None or family.shared_layers:
        raise UserError(f"early exit needs one list of transformer layers; {family.display} does not have one")
    layers = int(family.config_value(ckpt.config, family.layers_key, 0))
    exit_layers = check_exit_layers(config.exit_layers, layers)
    ts = load_texts(data, text_column, label_column)
    if len(ts.texts) < MIN_TEXTS:
        raise UserError(f"{data} has {len(ts.texts)} texts: early exit needs >= {MIN_TEXTS} (to train heads and hold rows out)")
    labels = label_ids(ts.labels, ckpt.id2label) if ts.labels is not None else None
    return EarlyExitPlan(plan, config, exit_layers, layers, ts.texts, labels, str(data))


# -- the model as segments ---------------------------------------------------------------------

def _torch_modules():
    import torch

    class ExitHead(torch.nn.Module):
        """dense + tanh + classifier on the first token's hidden state (the pooler's shape)."""

        def __init__(self, hidden: int, labels: int):
            super().__init__()
            self.dense = torch.nn.Linear(hidden, hidden)
            self.classifier = torch.nn.Linear(hidden, labels)

        def forward(self, first_token):
            return self.classifier(torch.tanh(self.dense(first_token)))

    class PassEmbeddings(torch.nn.Module):
        """Stands in for a model's embeddings in a later segment: its input is already hidden states."""

        def forward(self, *args, **kwargs):
            if torch.is_tensor(kwargs.get("inputs_embeds")):
                return kwargs["inputs_embeds"]
            return next(v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v.is_floating_point())

    class FirstSegment(torch.nn.Module):
        def __init__(self, base, head, input_names):
            super().__init__()
            self.base, self.head, self.input_names = base, head, list(input_names)

        def forward(self, *inputs):
            h = self.base(**dict(zip(self.input_names, inputs)))[0]
            return h, self.head(h[:, 0])

    class MiddleSegment(torch.nn.Module):
        def __init__(self, base, head):
            super().__init__()
            self.base, self.head = base, head

        def forward(self, hidden_states, attention_mask):
            h = self.base(inputs_embeds=hidden_states, attention_mask=attention_mask)[0]
            return h, self.head(h[:, 0])

    class LastSegment(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, hidden_states, attention_mask):
            return self.model(inputs_embeds=hidden_states, attention_mask=attention_mask).logits

    return ExitHead, PassEmbeddings, FirstSegment, MiddleSegment, LastSegment


def _layer_list(model, family):
    base = getattr(model, model.base_model_prefix)
    parent_path, _, attr = family.layers_module.rpartition(".")
    parent = attrgetter(parent_path)(base) if parent_path else base
    return base, parent, attr


def _with_layers(module, model, family, start: int, stop: int):
    """A deep copy of ``module`` (the model or its base) holding only layers[start:stop]."""
    import torch

    _, parent, attr = _layer_list(model, family)
    every = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList(list(every)[start:stop]))
    try:
        return copy.deepcopy(module)
    finally:
        setattr(parent, attr, every)


def _without_embeddings(base):
    _, PassEmbeddings, *_ = _torch_modules()
    base.embeddings = PassEmbeddings()
    if hasattr(base, "embeddings_project"):  # ELECTRA: projects the embeddings to the hidden size, once
        del base.embeddings_project
    return base


def model_input_names(model, tokenizer) -> list[str]:
    """The inputs segment 0 takes: token types only where both the tokenizer makes them and
    the model reads them (RoBERTa's tokenizer makes none, DistilBERT's model reads none)."""
    import inspect

    takes = inspect.signature(model.forward).parameters
    types = "token_type_ids" in takes and "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if types else [])


def segment_modules(model, family, exit_layers: list[int], heads: list, input_names: list[str]) -> list:
    """The model cut after each exit layer: [first, middle..., last] torch modules."""
    _, _, FirstSegment, MiddleSegment, LastSegment = _torch_modules()
    base, _, _ = _layer_list(model, family)
    bounds = [0, *exit_layers]
    segments = []
    for k, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        part = _with_layers(base, model, family, start, stop)
        if k == 0:
            segments.append(FirstSegment(part, heads[k], input_names))
        else:
            segments.append(MiddleSegment(_without_embeddings(part), heads[k]))
    last = _with_layers(model, model, family, exit_layers[-1], None)
    _without_embeddings(getattr(last, last.base_model_prefix))
    segments.append(LastSegment(last))
    return [s.eval() for s in segments]


def export_segments(segments: list, input_names: list[str], folder: Path, opset: int, sample: dict) -> list[dict]:
    """ONNX files of ``segments`` (dynamic batch and sequence) in ``folder``; their records."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    records = []
    feeds = {k: torch.from_numpy(v) for k, v in sample.items()}
    hidden = None
    for k, seg in enumerate(segments):
        last = k == len(segments) - 1
        if k == 0:
            args = tuple(feeds[n] for n in input_names)
            names = list(input_names)
        else:
            args = (hidden, feeds["attention_mask"])
            names = ["hidden_states_in", "attention_mask"]
        outputs = ["logits"] if last else ["hidden_states", "exit_logits"]
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        axes |= {"logits": {0: "batch"}} if last else {"hidden_states": {0: "batch", 1: "sequence"}, "exit_logits": {0: "batch"}}
        path = folder / f"segment-{k}.onnx"
        with torch.no_grad():
            torch.onnx.export(seg, args, str(path), input_names=names, output_names=outputs, dynamic_axes=axes,
                              opset_version=opset, dynamo=False)
            if not last:
                hidden = seg(*args)[0]
        records.append({"path": f"{MODEL_DIR}/{path.name}", "inputs": names, "outputs": outputs})
    return records


# -- segments through the profile's passes ---------------------------------------------------------

# What the ONNX Runtime fallbacks of ``ort-dynamic-quantize`` judge is the task's output
# (``logits``): a segment with an exit is compiled with its ``exit_logits`` named so, and
# named back afterwards, so its exit head's decisions are what its float fallback keeps.
_JUDGED = "logits"


def _rename_output(model, old: str, new: str):
    """``model`` (an ``onnx.ModelProto``) with the tensor ``old`` named ``new`` everywhere."""
    for node in model.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
        node.input[:] = [new if i == old else i for i in node.input]
    for v in [*model.graph.output, *model.graph.value_info]:
        if v.name == old:
            v.name = new
    return model


def segment_encoder(encode, fp32_runners: list, k: int):
    """``encode(texts, padding=..., length=...)`` for segment ``k``: the inputs it really sees,
    the texts run through the fp32 segments before it (the tokenizer's inputs for segment 0).
    What a pass calibrates or scores a segment on."""

    def encode_k(texts, pairs=None, padding: str = "longest", length: int | None = None) -> dict:
        feeds = encode(texts, pairs, padding=padding, length=length)
        if k == 0:
            return feeds
        mask = feeds["attention_mask"]
        out = fp32_runners[0].infer(feeds)
        for runner in fp32_runners[1:k]:
            out = runner.infer({"hidden_states_in": out["hidden_states"], "attention_mask": mask})
        return {"hidden_states_in": out["hidden_states"], "attention_mask": mask}

    return encode_k


def compile_segments(profile, fp32_dir: Path, records: list[dict], dest: Path, *, encode, calibration_texts: list[str],
                     workdir: Path, family: str, model_config: dict, threads: int, reporter) -> list[dict]:
    """Each fp32 segment of ``fp32_dir`` through the profile's passes (``building.convert``'s own
    pass loop, the profile's settings), calibrated and scored on the inputs that segment sees
    (``segment_encoder``); the results in ``dest`` as ``segment-K.onnx`` (or ``.xml``/``.bin``).
    Returns the segments' records: path, inputs, outputs, format and the passes' notes."""
    import contextlib
    import shutil
    from types import SimpleNamespace

    import onnx

    from bertexport.backends import get_backend
    from bertexport.building.convert import _run_passes
    from bertexport.building.passes import PassContext

    ort = get_backend("onnxruntime")
    fp32 = [ort.make_runner(fp32_dir / Path(r["path"]).name, None, threads) for r in records]
    dest.mkdir(parents=True, exist_ok=True)
    compiled = []
    with contextlib.ExitStack() as stack:
        for runner in fp32[:-1]:  # the last one's output is no segment's input
            stack.enter_context(runner)
        for k, record in enumerate(records):
            last = k == len(records) - 1
            src = fp32_dir / Path(record["path"]).name
            seg_dir = workdir / f"segment-{k}"
            seg_dir.mkdir(parents=True)
            renamed = not last and profile.backend == "onnxruntime"
            if renamed:  # the exit head's logits are what the float fallback judges
                src_model = _rename_output(onnx.load(str(src)), "exit_logits", _JUDGED)
                src = seg_dir / src.name
                onnx.save(src_model, str(src))
            outputs = [_JUDGED if (renamed and o == "exit_logits") else o for o in record["outputs"]]
            ctx = PassContext(workdir=seg_dir, input_names=list(record["inputs"]), encode=segment_encoder(encode, fp32, k),
                              calibration_texts=lambda: calibration_texts, threads=threads, log=reporter.log, family=family,
                              task=TASK, model_config=model_config, profile=profile, output_names=outputs)
            reporter.log(f"segment {k + 1} of {len(records)}: {', '.join(p.type for p in profile.passes)}")
            final, history = _run_passes(profile, SimpleNamespace(path=src), ctx, reporter)
            if final.format == "onnx":
                target = dest / f"segment-{k}.onnx"
                model = onnx.load(str(final.path))
                onnx.save(_rename_output(model, _JUDGED, "exit_logits") if renamed else model, str(target))
            else:  # OpenVINO IR: the .xml finds its .bin by name
                for f in final.files:
                    shutil.copy2(f, dest / f"segment-{k}{f.suffix}")
                target = dest / f"segment-{k}{final.path.suffix}"
            compiled.append(record | {"path": f"{MODEL_DIR}/{target.name}", "format": final.format, "passes": history})
    return compiled


# -- heads ---------------------------------------------------------------------------------------

def teacher_states(model, encode, texts: list[str], exit_layers: list[int], max_length: int, batch: int = 32):
    """Each exit layer's first-token hidden state and the teacher's logits, for every text
    (one forward pass of the teacher, batched by length)."""
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    cls_rows: list[list] = [[None] * len(texts) for _ in exit_layers]
    logits = [None] * len(texts)
    with torch.no_grad():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            feeds = encode([texts[i] for i in idx], length=max_length)
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, output_hidden_states=True)
            for j, layer in enumerate(exit_layers):
                first = out.hidden_states[layer][:, 0].float().numpy()
                for r, i in enumerate(idx):
                    cls_rows[j][i] = first[r]
            for r, i in enumerate(idx):
                logits[i] = out.logits[r].float().numpy()
    states = [np.stack(rows) for rows in cls_rows]
    return states, np.stack(logits)


def _initial_head(model, hidden: int, labels: int):
    """An exit head started from the teacher's own pooler dense + classifier when their shapes fit."""
    import torch

    ExitHead, *_ = _torch_modules()
    head = ExitHead(hidden, labels)
    base = getattr(model, model.base_model_prefix)
    dense = next((m for m in (getattr(getattr(base, "pooler", None), "dense", None),
                              getattr(getattr(model, "classifier", None), "dense", None), getattr(model, "pre_classifier", None))
                  if isinstance(m, torch.nn.Linear) and tuple(m.weight.shape) == (hidden, hidden)), None)
    out = next((m for m in (getattr(model, "classifier", None), getattr(getattr(model, "classifier", None), "out_proj", None))
                if isinstance(m, torch.nn.Linear) and tuple(m.weight.shape) == (labels, hidden)), None)
    with torch.no_grad():
        if dense is not None:
            head.dense.load_state_dict(dense.state_dict())
        if out is not None:
            head.classifier.load_state_dict(out.state_dict())
    return head


def train_heads(model, states: list[np.ndarray], teacher_logits: np.ndarray, labels: np.ndarray | None,
                cfg: EarlyExitConfig) -> tuple[list, list[dict]]:
    """One head per exit on its cached states: KL to the teacher's softened probabilities
    (+ cross-entropy on labels). Returns the heads and, per exit, the training figures."""
    import torch
    import torch.nn.functional as F

    hidden, n_labels = states[0].shape[1], teacher_logits.shape[1]
    target = torch.from_numpy(teacher_logits)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)) if labels is not None else None
    t = cfg.temperature
    heads, figures = [], []
    for j, x_np in enumerate(states):
        torch.manual_seed(cfg.seed + j)
        head = _initial_head(model, hidden, n_labels).train()
        x = torch.from_numpy(x_np)
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.01)
        gen = torch.Generator().manual_seed(cfg.seed + j)
        loss_value = float("nan")
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
                s = head(x[idx])
                loss = F.kl_div(F.log_softmax(s / t, -1), F.softmax(target[idx] / t, -1), reduction="batchmean") * t * t
                if y is not None:
                    loss = loss + cfg.alpha_ce * F.cross_entropy(s, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_value = float(loss.detach())
        head.eval()
        with torch.no_grad():
            agree = float((head(x).argmax(-1) == target.argmax(-1)).float().mean())
        heads.append(head)
        figures.append({"train_rows": len(x), "last_loss": loss_value, "train_agreement": agree})
    return heads, figures


# -- threshold and latency -------------------------------------------------------------------------

def simulate(exit_logits: list[np.ndarray], final_logits: np.ndarray, exit_layers: list[int], layers: int,
             threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Each row's decision and the layer count it ran at ``threshold`` (the runtime's rule)."""
    from bertexport.shipping.runtime import _softmax_max

    decision = final_logits.argmax(-1).copy()
    ran = np.full(len(final_logits), layers)
    open_rows = np.ones(len(final_logits), bool)
    for scores, layer in zip(exit_logits, exit_layers):
        leave = open_rows & (_softmax_max(scores) > threshold)
        decision[leave] = scores[leave].argmax(-1)
        ran[leave] = layer
        open_rows &= ~leave
    return decision, ran


def choose_threshold(exit_logits: list[np.ndarray], final_logits: np.ndarray, exit_layers: list[int], layers: int,
                     agreement: float) -> dict:
    """The smallest threshold, scanning down from 1.0, before held-out agreement with the full
    model first falls below ``agreement`` (thresholds between observed exit confidences)."""
    from bertexport.shipping.runtime import _softmax_max

    full = final_logits.argmax(-1)
    confidences = np.unique(np.concatenate([_softmax_max(s) for s in exit_logits]))
    # a candidate just below each observed confidence lets exactly the rows at or above it leave
    candidates = [1.0] + sorted({float(np.nextafter(c, -np.inf)) for c in confidences if c <= 1.0}, reverse=True)
    curve, chosen = [], 1.0
    for t in candidates:
        decision, ran = simulate(exit_logits, final_logits, exit_layers, layers, max(t, 0.0))
        agree = float((decision == full).mean())
        curve.append({"threshold": max(t, 0.0), "agreement": agree, "mean_layers": float(ran.mean())})
        if agree < agreement:
            break
        chosen = max(t, 0.0)
    decision, ran = simulate(exit_logits, final_logits, exit_layers, layers, chosen)
    return {"threshold": chosen, "agreement": float((decision == full).mean()), "mean_layers": float(ran.mean()),
            "exits": {str(layer): int((ran == layer).sum()) for layer in [*exit_layers, layers]},
            "rows": int(len(full)), "curve": curve[:: max(1, len(curve) // 50)]}


def runner_outputs(runner, encode, texts: list[str], batch: int = 16):
    """Every exit's logits and the final logits of ``texts`` through the artifact's segments."""
    exits: list[list] = []
    finals = []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        e, f = runner.every_exit(encode([texts[i] for i in idx]))
        exits.append(e)
        finals.append(f)
    back = np.argsort(np.concatenate([order[s:s + batch] for s in range(0, len(order), batch)]))
    return [np.concatenate([e[j] for e in exits])[back] for j in range(len(exits[0]))], np.concatenate(finals)[back]


def row_latency(runner, encode, texts: list[str], threshold: float, runs: int) -> dict:
    """Per-row latency (batch 1, each row at its own length) at ``threshold`` and with no row
    exiting (the worst case), interleaved (``judging.latency``), over ``texts``."""
    from bertexport.judging.latency import Latency, time_interleaved

    at, worst = [], []
    for text in texts:
        feeds = encode([text])
        timed = time_interleaved({"threshold": lambda: runner.infer(feeds, threshold), "no-exit": lambda: runner.infer(feeds, 1.0)},
                                 runs=runs, warmup=1)
        at.append(timed["threshold"].p50)
        worst.append(timed["no-exit"].p50)
    a, w = Latency.from_values(at), Latency.from_values(worst)
    keep = ("mean", "p50", "p90", "max")
    return {"rows": len(texts), "batch": 1, "runs_per_row": runs, "unit": "s",
            "at_threshold": {k: getattr(a, k) for k in keep}, "no_exit": {k: getattr(w, k) for k in keep},
            "mean_ratio": w.mean / a.mean if a.mean > 0 else None}


# -- the build -------------------------------------------------------------------------------------

@dataclass
class EarlyExitResult:
    artifact: Path
    passed: bool
    failures: list[str]
    manifest: dict
    rows: list[dict] = field(default_factory=list)
    verdict: str = "passed"
    undecided: list[str] = field(default_factory=list)
    signature: Path | None = None


def build_early_exit(model: str, target, out, data, *, config: EarlyExitConfig | None = None, task: str | None = None,
                     samples=None, text_column: str | None = None, label_column: str | None = None, force: bool = False,
                     threads: int = 1, latency_runs: int | None = None, allow_pickle: bool = False,
                     trust_remote_code: bool = False, revision: str | None = None, reporter=None, calib=None) -> EarlyExitResult:
    """An early-exit artifact of ``model`` (a text classifier) in ``out``: heads trained on
    ``data``, ONNX segments compiled by the profile's passes (``compile_segments``; calibrated on
    the training rows of ``data``), parity of the no-exit path against PyTorch by the profile's
    gates (``samples`` or the built-in texts), the threshold (``config.threshold`` or chosen on
    held-out rows through the compiled segments), latency per held-out row. Raises ``UserError`` before any model loads for bad input
    and ``GateFailed`` (kept as ``<out>.rejected``) when parity fails."""
    from bertexport.building.checkpoint import load_model, load_tokenizer, model_max_length
    from bertexport.building.convert import TOKENIZER_DIR, _write_side_files
    from bertexport.building.report import render_report, summary_rows
    from bertexport.core.envinfo import cpu_count, environment
    from bertexport.core.families import get_family
    from bertexport.core.manifest import Manifest, manifest_header, write_manifest
    from bertexport.core.progress import Reporter
    from bertexport.core.staging import StagedFolder, WorkFolder
    from bertexport.judging.compare import batch_invariance, parity_checks, reference_runner
    from bertexport.judging.gates import judge_checks, profile_status
    from bertexport.backends import get_backend
    from bertexport.building.export import io_specs
    from bertexport.core.textdata import sample as sample_texts
    from bertexport.shipping.runtime import EarlyExitRunner, TextEncoder

    reporter = reporter or Reporter()
    if calib is not None:
        raise UserError("an early-exit build calibrates on its own texts (the --early-exit data): it takes no calibration file")
    plan = plan_early_exit(model, target, out, data, config=config, text_column=text_column, label_column=label_column,
                           task=task, samples=samples, force=force, threads=threads, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, revision=revision)
    cfg, cp = plan.config, plan.convert
    ckpt, profile, out = cp.ckpt, cp.profile, cp.out
    family = get_family(ckpt.family)
    import torch

    with reporter.step(f"load {ckpt.family} checkpoint ({ckpt.task})"):
        torch_model = load_model(ckpt)
        tokenizer = load_tokenizer(ckpt)
    max_length = model_max_length(ckpt.config, tokenizer)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(plan.texts))
    n_held = max(1, int(round(len(order) * cfg.heldout_fraction)))
    held, train = sorted(order[:n_held].tolist()), sorted(order[n_held:].tolist())

    with StagedFolder(out, force, [ckpt.path], "artifact folder") as staged, WorkFolder("early-exit") as work:
        _write_side_files(staged.staging, ckpt, tokenizer, max_length)
        tok_dir = staged.staging / TOKENIZER_DIR
        input_names = model_input_names(torch_model, tokenizer)
        encoder = TextEncoder.from_folder(tok_dir, input_names, max_length)
        before = torch.get_num_threads()
        torch.set_num_threads(max(threads, 1))
        try:
            with reporter.step(f"teacher states after layers {', '.join(map(str, plan.exit_layers))} on {len(plan.texts)} texts"):
                states, teacher_logits = teacher_states(torch_model, encoder.encode, plan.texts, plan.exit_layers,
                                                        min(cfg.max_length, max_length))
            with reporter.step(f"train {len(plan.exit_layers)} exit head(s) on {len(train)} texts, body frozen"):
                heads, head_figures = train_heads(torch_model, [s[train] for s in states], teacher_logits[train],
                                                  plan.labels[train] if plan.labels is not None else None, cfg)
            # fp32 segments are the artifact for a profile without passes, else what its passes start from
            fp32_dir = Path(work) / "fp32" if profile.passes else staged.staging / MODEL_DIR
            with reporter.step(f"export {len(plan.exit_layers) + 1} ONNX segments (opset {profile.opset})"):
                segments = segment_modules(torch_model, family, plan.exit_layers, heads, input_names)
                sample = encoder.encode(plan.texts[:2])
                records = export_segments(segments, input_names, fp32_dir, profile.opset, sample)
        finally:
            torch.set_num_threads(before)
        fp32_records = records
        calibration_texts = sample_texts([plan.texts[i] for i in train], CALIBRATION_TEXTS, cfg.seed)
        if profile.passes:
            with reporter.step(f"{profile.name} recipe on each segment (calibrated on {len(calibration_texts)} training texts)"):
                records = compile_segments(profile, fp32_dir, records, staged.staging / MODEL_DIR, encode=encoder.encode,
                                           calibration_texts=calibration_texts, workdir=Path(work) / "passes",
                                           family=ckpt.family, model_config=ckpt.config, threads=threads, reporter=reporter)
        else:
            records = [r | {"format": "onnx", "passes": []} for r in records]
        backend = get_backend(profile.backend)
        early = {"layers": plan.layers, "exit_layers": plan.exit_layers, "threshold": 1.0, "segments": records,
                 "backend": profile.backend, "precision": profile.precision, "format": records[0]["format"]}
        runner = EarlyExitRunner.from_manifest(early, lambda rel: backend.make_runner(staged.staging / rel, profile.runtime, threads))
        reference = reference_runner(ckpt, input_names, threads, torch_model=torch_model)
        with reference, runner:
            with reporter.step(f"validate the no-exit path on {len(cp.validation_texts)} texts"):
                reference.set_threads(cpu_count())
                runner.threshold = 1.0
                checks = parity_checks(reference, runner, encoder.encode, cp.validation_texts, ckpt.task,
                                       profile.validation.padded_length, cp.gates.level)
                invariance = batch_invariance(runner, encoder.encode, cp.validation_texts[:48], ckpt.task)
                reference.set_threads(threads)
            decision = judge_checks(checks, cp.gates)
            failures = list(decision.failures)
            with reporter.step(f"exit confidences on {len(held)} held-out texts"):
                held_texts = [plan.texts[i] for i in held]
                exit_logits, final_logits = runner_outputs(runner, encoder.encode, held_texts)
            choice = choose_threshold(exit_logits, final_logits, plan.exit_layers, plan.layers, cfg.agreement)
            if cfg.threshold is not None:
                decision_at, ran = simulate(exit_logits, final_logits, plan.exit_layers, plan.layers, cfg.threshold)
                choice = {"threshold": cfg.threshold, "given": True,
                          "agreement": float((decision_at == final_logits.argmax(-1)).mean()), "mean_layers": float(ran.mean()),
                          "exits": {str(layer): int((ran == layer).sum()) for layer in [*plan.exit_layers, plan.layers]},
                          "rows": len(held), "chosen_would_be": choice["threshold"]}
            threshold = choice["threshold"]
            reporter.log(f"threshold {threshold:.6g}: held-out agreement {choice['agreement']:.4f}, "
                         f"{choice['mean_layers']:.2f} of {plan.layers} layers on average")
            runs = profile.latency.runs if latency_runs is None else latency_runs
            latency = None
            if runs > 0:
                with reporter.step(f"latency per held-out row (batch 1), {runs} interleaved runs each"):
                    latency = row_latency(runner, encoder.encode, held_texts, threshold, runs) | {"threads": threads}
            load_seconds = runner.load_seconds
        early |= {"threshold": threshold, "rule": RULE, "agreement_gate": cfg.agreement,
                  "choice": choice, "heads": head_figures, "latency": latency,
                  "data": {"source": plan.data_source, "texts": len(plan.texts), "train": len(train), "heldout": len(held),
                           "labels": plan.labels is not None},
                  "training": {"epochs": cfg.epochs, "lr": cfg.lr, "temperature": cfg.temperature,
                               "alpha_ce": cfg.alpha_ce if plan.labels is not None else 0.0, "seed": cfg.seed}}
        ins, _ = io_specs(fp32_dir / Path(fp32_records[0]["path"]).name)  # the compiled segments keep these names
        _, outs = io_specs(fp32_dir / Path(fp32_records[-1]["path"]).name)
        passed = not failures
        env = environment()
        manifest = Manifest(**manifest_header(ckpt, passed, max_length), **{
            "model": {"path": records[0]["path"], "format": records[0]["format"], "backend": profile.backend,
                      "opset": profile.opset},
            "tokenizer": TOKENIZER_DIR,
            "labels": "labels.json" if ckpt.id2label else None,
            "inputs": [t.to_dict() for t in ins],
            "outputs": [t.to_dict() for t in outs] + [{"name": "exit_layer", "dtype": "int64", "shape": ["batch"]}],
            "target": {"name": profile.name, "backend": profile.backend, "precision": profile.precision,
                       "description": profile.description, "runtime": profile.runtime,
                       "shapes": {"batch": profile.batch.__dict__, "sequence": profile.sequence.__dict__},
                       # each segment went through these (its own notes: early_exit.segments[k].passes)
                       "passes": [{"type": h["type"], "config": h["config"]} for h in records[0]["passes"]]},
            "calibration": {"source": f"{plan.data_source} (training rows)", "count": len(calibration_texts), "seed": cfg.seed,
                            "skipped": {}} if profile.passes else None,
            "parity": {"texts": len(cp.validation_texts), "source": cp.validation_source, "path": "no exit (threshold 1.0)",
                       "gates": cp.gates.given(), "rule": profile.validation.rule,
                       "checks": checks, "passed": passed, "verdict": profile_status(decision), "failures": failures,
                       "undecided": decision.undecided, "within_noise": decision.within_noise,
                       "verdicts": [v.to_dict() for v in decision.verdicts]},
            "batch_invariance": invariance,
            "latency": None,
            "early_exit": early,
            "load_seconds": load_seconds,
            "sizes": {"source_weights_bytes": sum(p.stat().st_size for p in ckpt.weight_files),
                      "model_bytes": sum(f.stat().st_size for f in (staged.staging / MODEL_DIR).iterdir())},
            "threads": threads,
            "versions": env["packages"] | backend.versions(),
            "environment": {k: v for k, v in env.items() if k != "packages"},
        }).to_dict()
        rows = summary_rows(manifest)
        (staged.staging / "report.md").write_text(render_report(manifest, rows) + "\n" + early_exit_report(early))
        manifest = write_manifest(staged.staging, manifest)
        artifact = staged.publish(passed)
    result = EarlyExitResult(artifact, passed, failures, manifest, rows, profile_status(decision), decision.undecided)
    if not passed:
        raise GateFailed(failures, result)
    return result


def early_exit_report(early: dict) -> str:
    """The early-exit section of ``report.md``."""
    c = early["choice"]
    lines = ["## Early exit", "",
             f"- exits after layers {', '.join(map(str, early['exit_layers']))} of {early['layers']}; {early['rule']}",
             f"- threshold **{early['threshold']:.6g}** ({'given' if c.get('given') else 'chosen'}; agreement gate "
             f"{early['agreement_gate']}): held-out agreement with the full model {c['agreement']:.4f} on {c['rows']} rows, "
             f"{c['mean_layers']:.2f} layers per row on average",
             "- rows leaving at each exit: " + ", ".join(f"after {k}: {v}" for k, v in c["exits"].items())]
    lat = early.get("latency")
    if lat:
        a, w = lat["at_threshold"], lat["no_exit"]
        lines.append(f"- latency per row (batch 1, {lat['rows']} held-out rows, {lat['threads']} thread(s)): mean "
                     f"{a['mean'] * 1e3:.2f} ms, p90 {a['p90'] * 1e3:.2f} ms at the threshold; worst case (no row exits) "
                     f"mean {w['mean'] * 1e3:.2f} ms, p90 {w['p90'] * 1e3:.2f} ms")
    return "\n".join(lines) + "\n"
