"""``pack --format triton``: an NVIDIA Triton Inference Server model repository for an artifact.

Three models, each a folder with a ``config.pbtxt`` (the text form of Triton's
``ModelConfig`` protobuf) and a version folder ``1/``:

- ``NAME_model``: the artifact's model on the Triton backend that runs it — ``onnxruntime``
  for ONNX Runtime artifacts, ``openvino`` for OpenVINO IR, ``tensorrt`` (platform
  ``tensorrt_plan``) for TensorRT engines — with its inputs and outputs, batching on the
  first axis (``max_batch_size`` + ``dims`` without it, ``-1`` for the sequence) and
  ``dynamic_batching``;
- ``NAME_tokenizer``: the artifact's ``tokenizer.json`` as a Python-backend model
  (``model.py``, Triton's ``TritonPythonModel``): text (``TYPE_STRING``) in, the model's
  token tensors out, exactly as ``bertexport run`` encodes one text (truncated at the
  artifact's max length; ``run`` windows longer texts instead);
- ``NAME``: an ``ensemble`` wiring text -> tokenizer -> model, what clients call. It
  returns the model's raw outputs and the attention mask (pooling, softmax and label names
  stay with the client: the ``labels.json`` of the artifact is copied next to the model's
  config as its ``label_filename``).

Formats as documented by Triton (model_configuration.md, ensemble_models.md, the
python_backend README and the OpenVINO backend README). Nothing here imports Triton:
tests parse every ``config.pbtxt`` with the official protobufs of ``tritonclient``.
No Triton server runs on this project's machines: the repository is built and checked,
not served here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from bertexport.core.errors import UserError
from bertexport.core.interrupts import track, untrack
from bertexport.core.manifest import DIGEST_KEY, load_manifest, verify_files
from bertexport.core.orphans import sweep_orphans
from bertexport.core.staging import protected_reason, swap_into_place

MARKER = "bertexport-triton.json"  # at the repository's root: what it was made from (Triton ignores files there)
VERSION = "1"
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_QUEUE_DELAY_US = 2000  # as `serve --max-wait-ms 2`

# artifact backend -> (Triton backend, Triton platform or None, instance kind)
BACKENDS = {
    "onnxruntime": ("onnxruntime", None, "KIND_CPU"),
    "openvino": ("openvino", None, "KIND_CPU"),
    "tensorrt": ("tensorrt", "tensorrt_plan", "KIND_GPU"),
}
# artifact model format each backend takes
FORMATS = {"onnxruntime": "onnx", "openvino": "openvino-ir", "tensorrt": "tensorrt-engine"}
# manifest dtype -> Triton data type (model_config.proto DataType)
DATA_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
              "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TEXT, TEXT_PAIR = "TEXT", "TEXT_PAIR"


# -- config.pbtxt, written as protobuf text ------------------------------------------------

def _q(s: str) -> str:
    return json.dumps(str(s))  # a protobuf text string: double quotes, backslash escapes


def _tensor(t: dict) -> str:
    lines = [f"    name: {_q(t['name'])}", f"    data_type: {t['data_type']}", f"    dims: [ {', '.join(map(str, t['dims']))} ]"]
    if t.get("optional"):
        lines.append("    optional: true")
    if t.get("label_filename"):
        lines.append(f"    label_filename: {_q(t['label_filename'])}")
    return "  {\n" + "\n".join(lines) + "\n  }"


def _config_text(cfg: dict) -> str:
    out = [f"name: {_q(cfg['name'])}"]
    if cfg.get("platform"):
        out.append(f"platform: {_q(cfg['platform'])}")
    if cfg.get("backend"):
        out.append(f"backend: {_q(cfg['backend'])}")
    out.append(f"max_batch_size: {int(cfg['max_batch_size'])}")
    if cfg.get("default_model_filename"):
        out.append(f"default_model_filename: {_q(cfg['default_model_filename'])}")
    out.append("input [\n" + ",\n".join(_tensor(t) for t in cfg["input"]) + "\n]")
    out.append("output [\n" + ",\n".join(_tensor(t) for t in cfg["output"]) + "\n]")
    if cfg.get("instance_group"):
        out.append("instance_group [\n" + ",\n".join(
            f"  {{\n    count: {g['count']}\n    kind: {g['kind']}\n  }}" for g in cfg["instance_group"]) + "\n]")
    if cfg.get("dynamic_batching") is not None:
        db = cfg["dynamic_batching"]
        out.append("dynamic_batching {\n" + f"  max_queue_delay_microseconds: {int(db['max_queue_delay_microseconds'])}\n" + "}")
    for key, value in (cfg.get("parameters") or {}).items():
        out.append(f"parameters {{\n  key: {_q(key)}\n  value {{\n    string_value: {_q(value)}\n  }}\n}}")
    if cfg.get("ensemble_steps"):
        steps = []
        for s in cfg["ensemble_steps"]:
            body = [f"      model_name: {_q(s['model_name'])}", "      model_version: -1"]
            body += [f"      input_map {{\n        key: {_q(k)}\n        value: {_q(v)}\n      }}" for k, v in s["input_map"].items()]
            body += [f"      output_map {{\n        key: {_q(k)}\n        value: {_q(v)}\n      }}" for k, v in s["output_map"].items()]
            steps.append("    {\n" + "\n".join(body) + "\n    }")
        out.append("ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}")
    return "\n".join(out) + "\n"


# -- what the artifact declares ------------------------------------------------------------------

def _dim(d) -> int:
    return int(d) if isinstance(d, int) and d > 0 else -1  # a named (dynamic) axis, or 0/unknown


def _data_type(t: dict) -> str:
    dt = DATA_TYPES.get(str(t["dtype"]))
    if dt is None:
        raise UserError(f"tensor {t['name']!r} has type {t['dtype']}, which this repository writer does not map to a Triton type")
    return dt


def _batched(manifest: dict) -> bool:
    """Triton batches on the first axis when every input and output has a dynamic one."""
    return all(t["shape"] and _dim(t["shape"][0]) == -1 for t in manifest["inputs"] + manifest["outputs"])


def _max_batch_size(manifest: dict, requested: int | None) -> int:
    if not _batched(manifest):
        return 0
    shapes = (manifest.get("target") or {}).get("shapes") or {}
    engine_max = (shapes.get("batch") or {}).get("max") if manifest["model"]["backend"] == "tensorrt" else None
    size = requested or (int(engine_max) if engine_max else DEFAULT_MAX_BATCH_SIZE)
    if engine_max and size > int(engine_max):
        raise UserError(f"--max-batch-size {size} is over the TensorRT engine's largest batch ({engine_max})")
    return size


def check_servable(folder: Path, manifest: dict) -> None:
    """Refuse (exit 2) an artifact no Triton backend can serve as it is."""
    if manifest.get("early_exit"):
        raise UserError(f"{folder}: an early-exit artifact is a chain of segments whose rows leave by a threshold; "
                        "bertexport's runtime runs it (run, serve), a Triton repository of it is not built")
    backend = manifest["model"].get("backend")
    if backend not in BACKENDS:
        raise UserError(f"{folder}: a {backend!r} artifact has no Triton backend here (ONNX Runtime, OpenVINO IR and "
                        "TensorRT artifacts do)")
    fmt = manifest["model"].get("format")
    if fmt != FORMATS[backend]:
        raise UserError(f"{folder}: its model is {fmt!r}; Triton's {BACKENDS[backend][0]} backend takes {FORMATS[backend]}")
    names = [t["name"] for t in manifest["inputs"]]
    unknown = [n for n in names if n not in TOKEN_INPUTS]
    if unknown:
        raise UserError(f"{folder}: the model takes {', '.join(unknown)}, which the tokenizer model cannot produce "
                        f"(it makes {', '.join(TOKEN_INPUTS)})")
    for t in manifest["inputs"] + manifest["outputs"]:
        _data_type(t)
        if not t["shape"]:
            raise UserError(f"{folder}: tensor {t['name']!r} is a scalar; Triton needs its dims")
    if manifest.get("status") != "passed":
        raise UserError(f"{folder} was rejected at build time: a Triton repository is made from passed artifacts only")


# -- the three models ---------------------------------------------------------------------------

def _dims(t: dict, batched: bool) -> list[int]:
    shape = t["shape"][1:] if batched else t["shape"]
    return [_dim(d) for d in shape]


def _model_config(name: str, manifest: dict, max_batch: int, model_file: str, labels: str | None, delay_us: int) -> dict:
    backend, platform, kind = BACKENDS[manifest["model"]["backend"]]
    providers = ((manifest.get("target") or {}).get("runtime") or {}).get("providers") or []
    if any("CUDA" in p or "Tensorrt" in p for p in providers):  # ort-cuda / ort-trt artifacts: a GPU instance
        kind = "KIND_GPU"
    batched = max_batch > 0
    outputs = [{"name": t["name"], "data_type": _data_type(t), "dims": _dims(t, batched)} for t in manifest["outputs"]]
    if labels and manifest["task"] == "text-classification":
        outputs[0]["label_filename"] = labels
    cfg = {"name": name, "backend": backend, "platform": platform, "max_batch_size": max_batch,
           "default_model_filename": model_file,
           "input": [{"name": t["name"], "data_type": _data_type(t), "dims": _dims(t, batched)} for t in manifest["inputs"]],
           "output": outputs, "instance_group": [{"count": 1, "kind": kind}],
           "dynamic_batching": {"max_queue_delay_microseconds": delay_us} if batched else None}
    if backend == "openvino":
        cfg["parameters"] = {"PERFORMANCE_HINT": "LATENCY"}
    return cfg


def _tokenizer_config(name: str, manifest: dict, max_batch: int, pairs: bool, delay_us: int) -> dict:
    batched = max_batch > 0
    text_dims = [1]  # one string per batch row (with max_batch_size 0: one string per request)
    seq_dims = {t["name"]: _dims(t, batched) for t in manifest["inputs"]}
    fixed = {n: d[-1] for n, d in seq_dims.items() if d and d[-1] > 0}
    inputs = [{"name": TEXT, "data_type": "TYPE_STRING", "dims": text_dims}]
    if pairs:
        inputs.append({"name": TEXT_PAIR, "data_type": "TYPE_STRING", "dims": text_dims})
    params = {"max_length": str(manifest["max_length"]), "input_names": ",".join(t["name"] for t in manifest["inputs"]),
              "tokenizer": "tokenizer", "batched": "yes" if batched else "no"}
    if fixed:  # a model with a static sequence axis: pad every text to it
        params["pad_to"] = str(max(fixed.values()))
    return {"name": name, "backend": "python", "max_batch_size": max_batch, "input": inputs,
            "output": [{"name": t["name"], "data_type": "TYPE_INT64", "dims": seq_dims[t["name"]]} for t in manifest["inputs"]],
            "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
            "dynamic_batching": {"max_queue_delay_microseconds": delay_us} if batched else None,
            "parameters": params}


def _ensemble_config(name: str, tok: dict, model: dict, pairs: bool) -> dict:
    inputs = [dict(t) for t in tok["input"]]
    mask_out = next((t for t in tok["output"] if t["name"] == "attention_mask"), None)
    outputs = [{k: v for k, v in t.items() if k != "label_filename"} for t in model["output"]]
    steps = [
        {"model_name": tok["name"], "input_map": {t["name"]: t["name"] for t in inputs},
         "output_map": {t["name"]: f"tokens_{t['name']}" for t in tok["output"]}},
        {"model_name": model["name"], "input_map": {t["name"]: f"tokens_{t['name']}" for t in model["input"]},
         "output_map": {t["name"]: t["name"] for t in model["output"]}},
    ]
    if mask_out is not None:  # clients pool token vectors with it
        outputs.append({"name": "attention_mask", "data_type": mask_out["data_type"], "dims": mask_out["dims"]})
        steps[0]["output_map"]["attention_mask"] = "attention_mask"
        steps[1]["input_map"]["attention_mask"] = "attention_mask"
    return {"name": name, "platform": "ensemble", "max_batch_size": model["max_batch_size"], "input": inputs,
            "output": outputs, "ensemble_steps": steps}


# -- model.py of the tokenizer (runs inside Triton's Python backend: numpy + tokenizers only) --------

TOKENIZER_MODEL_PY = '''\
"""Tokenizer of a bertexport artifact as a Triton Python-backend model (written by
`bertexport pack --format triton`). Text in (TYPE_STRING), the model's token tensors out,
encoded as `bertexport run` encodes one text: the artifact's tokenizer.json, truncation at
its max length, padding to the longest text of the request with the tokenizer's pad id.
Needs numpy and tokenizers in the Python backend's environment."""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(HERE, params.get("tokenizer", "tokenizer"))
        self.tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        pad_token = None
        tok_config = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(tok_config):
            with open(tok_config, encoding="utf-8") as f:
                pad_token = json.load(f).get("pad_token")
            if isinstance(pad_token, dict):
                pad_token = pad_token.get("content")
        pad_id = self.tokenizer.token_to_id(pad_token) if pad_token else None
        self.pad_id = 0 if pad_id is None else pad_id
        self.max_length = int(params["max_length"])
        self.pad_to = int(params["pad_to"]) if params.get("pad_to") else None
        self.names = params["input_names"].split(",")
        self.pairs = any(i["name"] == "TEXT_PAIR" for i in config["input"])
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length)

    @staticmethod
    def _texts(request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in tensor.as_numpy().reshape(-1)]

    def encode(self, texts, pairs=None):
        items = list(zip(texts, pairs)) if pairs is not None else list(texts)
        encodings = self.tokenizer.encode_batch(items)
        width = self.pad_to or max(len(e.ids) for e in encodings)
        out = {"input_ids": np.full((len(encodings), width), self.pad_id, dtype=np.int64),
               "attention_mask": np.zeros((len(encodings), width), dtype=np.int64),
               "token_type_ids": np.zeros((len(encodings), width), dtype=np.int64)}
        for i, e in enumerate(encodings):
            n = len(e.ids)
            out["input_ids"][i, :n] = e.ids
            out["attention_mask"][i, :n] = e.attention_mask
            out["token_type_ids"][i, :n] = e.type_ids
        return {name: out[name] for name in self.names}

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                texts = self._texts(request, "TEXT")
                pairs = self._texts(request, "TEXT_PAIR") if self.pairs else None
                if not texts or any(not t.strip() for t in texts):
                    raise ValueError("empty text: every input needs at least one non-space character")
                if pairs is not None and len(pairs) != len(texts):
                    raise ValueError(f"TEXT_PAIR has {len(pairs)} texts for {len(texts)} in TEXT")
                feeds = self.encode(texts, pairs)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, value) for name, value in feeds.items()]))
            except Exception as e:  # one bad request gets its error; the others their answers
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses

    def finalize(self):
        self.tokenizer = None
'''


# -- the repository ---------------------------------------------------------------------------

def _check_out(out: Path, force: bool, artifact: Path) -> None:
    reason = protected_reason(out, [artifact])
    if reason:
        raise UserError(f"refusing to write the Triton repository {out}: {reason}")
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out} already exists; pass --force to replace it (only a repository bertexport wrote is replaced)")
        if out.is_symlink() or not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file()):
            raise UserError(f"refusing to replace {out}: it is not a Triton repository bertexport wrote (no {MARKER})")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot create {out}: {parent} is not a folder")
            break


def _model_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise UserError(f"{name!r} cannot name a Triton model (a folder name)")
    return name


def triton_repository(artifact: str | Path, out: str | Path, *, force: bool = False, model_name: str | None = None,
                      max_batch_size: int | None = None, max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> dict:
    """Write a Triton model repository for ``artifact`` at ``out``; returns what was written
    (model names, backend, batching). Everything is checked before anything is written; the
    repository is staged beside ``out`` and renamed into place when complete."""
    folder = Path(artifact)
    manifest = load_manifest(folder)
    problems = verify_files(folder, manifest)
    if problems:
        raise UserError(f"refusing to export {folder}: {'; '.join(problems[:3])}")
    check_servable(folder, manifest)
    if max_batch_size is not None and max_batch_size < 1:
        raise UserError("--max-batch-size must be at least 1")
    if max_queue_delay_us < 0:
        raise UserError("the queue delay must be >= 0")
    out = Path(out).expanduser().resolve()
    _check_out(out, force, folder)
    name = _model_name(model_name or folder.resolve().name)
    from bertexport.core.tasks import get_task

    pairs = get_task(manifest["task"]).needs_pair
    max_batch = _max_batch_size(manifest, max_batch_size)
    model_rel = Path(manifest["model"]["path"])
    model_dir = model_rel.parent
    model_files = [rel for rel in manifest["files"] if Path(rel).parent == model_dir]
    labels = manifest.get("labels")
    model_cfg = _model_config(f"{name}_model", manifest, max_batch, model_rel.name,
                              "labels.txt" if labels else None, max_queue_delay_us)
    tok_cfg = _tokenizer_config(f"{name}_tokenizer", manifest, max_batch, pairs, max_queue_delay_us)
    ens_cfg = _ensemble_config(name, tok_cfg, model_cfg, pairs)

    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_orphans(out.parent)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    track(staging)
    try:
        m = staging / model_cfg["name"]
        (m / VERSION).mkdir(parents=True)
        for rel in model_files:
            shutil.copy2(folder / rel, m / VERSION / Path(rel).name)
        if labels:  # label_filename: one label per line, in class-index order
            id2label = {int(k): v for k, v in json.loads((folder / labels).read_text()).items()}
            (m / "labels.txt").write_text("".join(f"{id2label[i]}\n" for i in sorted(id2label)))
        (m / "config.pbtxt").write_text(_config_text(model_cfg))
        t = staging / tok_cfg["name"]
        (t / VERSION).mkdir(parents=True)
        shutil.copytree(folder / manifest["tokenizer"], t / VERSION / "tokenizer")
        (t / VERSION / "model.py").write_text(TOKENIZER_MODEL_PY)
        (t / "config.pbtxt").write_text(_config_text(tok_cfg))
        e = staging / ens_cfg["name"]
        (e / VERSION).mkdir(parents=True)  # an ensemble has no model file, but Triton wants a version folder
        (e / "config.pbtxt").write_text(_config_text(ens_cfg))
        info = {"schema": "bertexport.shipping.triton/1", "artifact": str(folder.resolve()),
                "manifest_sha256": manifest.get(DIGEST_KEY), "task": manifest["task"],
                "backend": model_cfg["backend"], "platform": model_cfg.get("platform"),
                "max_batch_size": max_batch, "models": {"ensemble": name, "tokenizer": tok_cfg["name"], "model": model_cfg["name"]},
                "inputs": [t["name"] for t in ens_cfg["input"]], "outputs": [t["name"] for t in ens_cfg["output"]]}
        (staging / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        untrack(staging)
    return {"path": str(out), **info}
