"""Early exit's model as consecutive segments (``students.early_exit``): the teacher cut after
each exit layer into torch modules — ``embeddings + layers[0:a]`` -> (``hidden_states``,
``exit_logits``); ``layers[a:b]`` -> the same, from (``hidden_states_in``, ``attention_mask``);
the last, ``layers[z:]`` + the model's head -> ``logits`` — exported to ONNX, then each
compiled by the profile's passes on the inputs that segment really sees. A segment after
the first is the model with its embeddings replaced by a pass-through, so each family's own
attention-mask handling and heads are exported, not re-implemented."""

from __future__ import annotations

import copy
from operator import attrgetter
from pathlib import Path

MODEL_DIR = "model"
TASK = "text-classification"


def torch_modules():
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
    _, PassEmbeddings, *_ = torch_modules()
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
    _, _, FirstSegment, MiddleSegment, LastSegment = torch_modules()
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


# -- through the profile's passes ----------------------------------------------------------------

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
