"""Load and run a bertexport artifact with numpy, ``tokenizers`` and the backend's runtime
only: no torch, no transformers. What a device runs, and what ``validate``/``benchmark``
use to run artifacts, so the build machine measures the same code path that ships.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertexport.core.errors import UserError
from bertexport.core.manifest import load_manifest, verify_files


@dataclass
class TextEncoder:
    """The artifact's tokenizer (tokenizer.json), producing the model's exact inputs."""

    tokenizer: object
    input_names: list[str]
    max_length: int
    pad_id: int

    @classmethod
    def from_artifact(cls, folder: Path, manifest: dict) -> "TextEncoder":
        names = [i["name"] for i in manifest["inputs"]]
        return cls.from_folder(folder / manifest["tokenizer"], names, int(manifest["max_length"]))

    @classmethod
    def from_folder(cls, tok_dir: Path, input_names: list[str], max_length: int) -> "TextEncoder":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        pad_token = None
        cfg = tok_dir / "tokenizer_config.json"
        if cfg.is_file():
            pad_token = json.loads(cfg.read_text()).get("pad_token")
            if isinstance(pad_token, dict):
                pad_token = pad_token.get("content")
        pad_id = tok.token_to_id(pad_token) if pad_token else None
        tok.no_padding()
        tok.no_truncation()
        return cls(tok, list(input_names), int(max_length), 0 if pad_id is None else pad_id)

    def encode(self, texts, pairs=None, padding: str = "longest", length: int | None = None) -> dict[str, np.ndarray]:
        limit = min(length or self.max_length, self.max_length)
        batch = list(zip(texts, pairs)) if pairs is not None else list(texts)
        self.tokenizer.enable_truncation(max_length=limit)
        encs = self.tokenizer.encode_batch(batch)
        width = limit if padding == "max_length" else max(len(e.ids) for e in encs)
        out = {"input_ids": np.full((len(encs), width), self.pad_id, dtype=np.int64),
               "attention_mask": np.zeros((len(encs), width), dtype=np.int64),
               "token_type_ids": np.zeros((len(encs), width), dtype=np.int64)}
        for i, e in enumerate(encs):
            n = len(e.ids)
            out["input_ids"][i, :n] = e.ids
            out["attention_mask"][i, :n] = e.attention_mask
            out["token_type_ids"][i, :n] = e.type_ids
        return {k: out[k] for k in self.input_names}

    def offsets(self, text: str) -> list[tuple[int, int]]:
        self.tokenizer.enable_truncation(max_length=self.max_length)
        return list(self.tokenizer.encode(text).offsets)


def version_warnings(manifest: dict) -> list[str]:
    """The device tokenizes with its own ``tokenizers``: a different minor version than the
    build machine's may split text differently, so the outputs validated at build time
    would not be the ones served. Said, not refused (the artifact may still be fine)."""
    import importlib.metadata

    built = (manifest.get("versions") or {}).get("tokenizers")
    try:
        here = importlib.metadata.version("tokenizers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        return []
    if built and built.split(".")[:2] != here.split(".")[:2]:
        return [f"this artifact was built and validated with tokenizers {built}, this machine has {here}: "
                f"install tokenizers=={built} to serve exactly what was validated"]
    return []


class Artifact:
    """An artifact folder opened for inference: manifest, tokenizer, labels, runner."""

    def __init__(self, folder: str | Path, *, verify: bool = True, threads: int | None = None,
                 allow_rejected: bool = False, runtime_overrides: dict | None = None, trusted_key=None,
                 exit_threshold: float | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"artifact not found: {self.folder}")
        self.manifest = load_manifest(self.folder)
        if verify:
            problems = verify_files(self.folder, self.manifest)
            if problems:
                raise UserError(f"artifact {self.folder} failed its checksums: {'; '.join(problems[:3])}")
        if trusted_key:  # before anything of it is loaded
            from bertexport.shipping.signing import verify_signature

            verify_signature(self.folder, trusted_key)
        if self.manifest.get("status") != "passed" and not allow_rejected:
            raise UserError(f"artifact {self.folder} was rejected at build time ({'; '.join(self.manifest['parity']['failures'])})")
        self.task = self.manifest["task"]
        self.warnings = version_warnings(self.manifest)
        self.encoder = TextEncoder.from_artifact(self.folder, self.manifest)
        labels = self.manifest.get("labels")
        self.id2label = ({int(k): v for k, v in json.loads((self.folder / labels).read_text()).items()} if labels else None)
        from bertexport.backends import get_backend

        early = self.manifest.get("early_exit")
        # the backend the manifest names (an early-exit artifact's segments: ONNX Runtime or OpenVINO files)
        backend = get_backend((early or {}).get("backend") or self.manifest["model"]["backend"])
        runtime = dict(self.manifest["target"].get("runtime") or {}) | (runtime_overrides or {})
        if early:  # consecutive segments, rows leaving at confident exits (EarlyExitRunner)
            self.runner = EarlyExitRunner.from_manifest(early, lambda rel: backend.make_runner(self.folder / rel, runtime, threads),
                                                        exit_threshold)
        elif exit_threshold is not None:
            raise UserError(f"artifact {self.folder} has no early exits: an exit threshold does not apply to it")
        else:
            self.runner = backend.make_runner(self.folder / self.manifest["model"]["path"], runtime, threads)

    @property
    def name(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def model_bytes(self) -> int:
        return int(self.manifest["sizes"]["model_bytes"])

    def __enter__(self):
        self.runner.activate()
        return self

    def __exit__(self, *exc):
        self.runner.deactivate()

    @property
    def early_exit(self) -> bool:
        return bool(self.manifest.get("early_exit"))

    def infer(self, feeds: dict[str, np.ndarray], exit_threshold: float | None = None) -> dict[str, np.ndarray]:
        """The model's outputs; ``exit_threshold`` (an early-exit artifact only) overrides the
        threshold for this call."""
        if exit_threshold is None:
            return self.runner.infer(feeds)
        if not self.early_exit:
            raise UserError(f"artifact {self.folder} has no early exits: an exit threshold does not apply to it")
        return self.runner.infer(feeds, check_exit_threshold(exit_threshold))


def check_exit_threshold(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise UserError(f"the exit threshold must be a probability in [0, 1], not {value!r}")
    return float(value)


def check_exit_threshold_applies(folders, threshold: float | None) -> None:
    """``--exit-threshold`` of ``run``/``serve`` checked before anything loads: a probability,
    and every artifact folder an early-exit one (its manifest only is read)."""
    if threshold is None:
        return
    check_exit_threshold(threshold)
    for folder in [folders] if isinstance(folders, (str, Path)) else folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"artifact not found: {folder}")
        if not load_manifest(folder).get("early_exit"):
            raise UserError(f"artifact {folder} has no early exits: --exit-threshold applies to an early-exit artifact "
                            f"(convert --early-exit) only")


def _softmax_max(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).max(axis=-1)


class EarlyExitRunner:
    """An early-exit artifact's consecutive segments as one runner (the ``Runner`` interface:
    ``activate``/``infer``/``deactivate``, ``input_names``, ``load_seconds``), so ``run``, bulk
    runs and ``serve`` need no code of their own for it.

    Segment 0 takes the tokenizer's inputs and returns ``hidden_states`` and ``exit_logits``
    (the exit head after its last layer); each later segment takes ``hidden_states_in`` (the
    previous segment's ``hidden_states``) and ``attention_mask``; the last returns the model's
    own ``logits``. A row leaves at the first exit whose highest class probability is above
    ``threshold`` (so 1.0 never exits and 0.0 always leaves at the first exit); the next
    segment runs only the rows still there, cut
    to their longest length (right padding). ``infer`` returns ``logits`` and ``exit_layer``
    (the layer count each row ran; the model's depth when it did not exit)."""

    name = "early-exit"

    def __init__(self, segments: list, exit_layers: list[int], layers: int, threshold: float):
        if len(segments) != len(exit_layers) + 1:
            raise UserError(f"an early-exit artifact needs one segment more than exits ({len(segments)} segments, "
                            f"{len(exit_layers)} exits)")
        self.segments, self.exit_layers, self.layers = list(segments), list(exit_layers), int(layers)
        self.threshold = check_exit_threshold(threshold)
        self.is_active = False
        self.load_seconds: float | None = None
        self.input_names: list[str] = []
        self.output_names = ["logits", "exit_layer"]

    @classmethod
    def from_manifest(cls, early: dict, make_runner, threshold: float | None = None) -> "EarlyExitRunner":
        return cls([make_runner(seg["path"]) for seg in early["segments"]], [int(x) for x in early["exit_layers"]],
                   int(early["layers"]), early["threshold"] if threshold is None else threshold)

    def activate(self) -> "EarlyExitRunner":
        if not self.is_active:
            for seg in self.segments:
                seg.activate()
            self.load_seconds = sum(seg.load_seconds or 0.0 for seg in self.segments)
            self.input_names = list(self.segments[0].input_names)
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            for seg in self.segments:
                seg.deactivate()
            self.is_active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    def set_threads(self, threads: int) -> None:  # pragma: no cover - runners that support it
        for seg in self.segments:
            if hasattr(seg, "set_threads"):
                seg.set_threads(threads)

    def infer(self, feeds: dict[str, np.ndarray], threshold: float | None = None) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise RuntimeError(f"{self.name}: activate() the runner before infer()")
        threshold = self.threshold if threshold is None else threshold
        mask = np.asarray(feeds["attention_mask"])
        n = mask.shape[0]
        rows = np.arange(n)
        exit_layer = np.full(n, self.layers, dtype=np.int64)
        logits = None
        out = self.segments[0].infer(feeds)
        for k, layer in enumerate(self.exit_layers):
            scores = out["exit_logits"]
            if logits is None:
                logits = np.zeros((n, scores.shape[-1]), dtype=scores.dtype)
            leave = _softmax_max(scores) > threshold
            logits[rows[leave]] = scores[leave]
            exit_layer[rows[leave]] = layer
            stay = ~leave
            rows = rows[stay]
            if rows.size == 0:
                return {"logits": logits, "exit_layer": exit_layer}
            width = max(int(mask[rows].sum(axis=1).max()), 1)  # the rows left, cut to their longest (right padding)
            out = self.segments[k + 1].infer({"hidden_states_in": np.ascontiguousarray(out["hidden_states"][stay, :width]),
                                              "attention_mask": np.ascontiguousarray(mask[rows, :width])})
        final = out["logits"]
        if logits is None:
            logits = np.zeros((n, final.shape[-1]), dtype=final.dtype)
        logits[rows] = final
        return {"logits": logits, "exit_layer": exit_layer}

    def every_exit(self, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """Every exit's logits and the final logits of every row (no row leaves): what a
        threshold is chosen on."""
        if not self.is_active:
            raise RuntimeError(f"{self.name}: activate() the runner before every_exit()")
        mask = np.asarray(feeds["attention_mask"])
        exits = []
        out = self.segments[0].infer(feeds)
        for k in range(len(self.exit_layers)):
            exits.append(out["exit_logits"])
            out = self.segments[k + 1].infer({"hidden_states_in": out["hidden_states"], "attention_mask": mask})
        return exits, out["logits"]


def _special_token(folder: Path, name: str) -> str | None:
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    value = json.loads(cfg.read_text()).get(name)
    return value.get("content") if isinstance(value, dict) else value


# Texts longer than this many characters are tokenized and run one overlapping segment at
# a time, so memory stays bounded whatever the length (each window is reduced right after
# inference, see ``bertexport.core.tasks``).
SEGMENT_CHARS = 20_000
SEGMENT_OVERLAP_CHARS = 2_000


def segments(text: str, size: int = SEGMENT_CHARS, overlap: int = SEGMENT_OVERLAP_CHARS):
    """(start, piece) pieces of ``text`` of about ``size`` characters, cut at white space,
    each starting ``overlap`` characters before the previous one ended (context for the
    windows at the seam; tokens seen twice are averaged by the task's aggregation)."""
    if len(text) <= size:
        yield 0, text
        return
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind(" ", start + size // 2, end)
            end = cut if cut > start else end
        yield start, text[start:end]
        if end >= len(text):
            return
        nxt = max(end - overlap, start + 1)
        space = text.find(" ", nxt, end)
        start = space + 1 if space != -1 else nxt


class Predictor:
    """Task-level inference on an opened ``Artifact``: windows long texts, batches windows by
    length, runs the model, reduces and aggregates per task (``bertexport.core.tasks``)."""

    def __init__(self, artifact: Artifact, *, batch_size: int = 16, stride: int | None = None,
                 max_length: int | None = None, aggregation: str = "mean", top_k: int = 1,
                 normalize: bool | None = None, exit_threshold: float | None = None):
        from bertexport.core.tasks import Post, get_task

        self.art = artifact
        if exit_threshold is not None:  # an early-exit artifact's threshold for this predictor's calls
            if not artifact.early_exit:
                raise UserError(f"artifact {artifact.folder} has no early exits: an exit threshold does not apply to it")
            exit_threshold = check_exit_threshold(exit_threshold)
        self.exit_threshold = exit_threshold
        self.task = get_task(artifact.task)
        self.batch_size = batch_size
        self.max_length = min(max_length or artifact.encoder.max_length, artifact.encoder.max_length)
        self.stride = self.max_length // 4 if stride is None else stride
        if not 0 <= self.stride < self.max_length - 4:
            raise UserError(f"stride must be in [0, {self.max_length - 4}) for max length {self.max_length}")
        if aggregation not in ("mean", "max"):
            raise UserError("aggregation must be mean or max")
        pooling = artifact.manifest.get("pooling") or {}
        tok_dir = artifact.folder / artifact.manifest["tokenizer"]
        mask = _special_token(tok_dir, "mask_token")
        self.post = Post(id2label=artifact.id2label or {}, aggregation=aggregation, top_k=top_k,
                         pooling=pooling.get("mode", "mean"),
                         normalize=pooling.get("normalize", False) if normalize is None else normalize,
                         mask_id=artifact.encoder.tokenizer.token_to_id(mask) if mask else None,
                         id_to_token=artifact.encoder.tokenizer.id_to_token)

    def windows(self, texts, pairs=None, shift: int = 0):
        """Token windows of each text (or of each pair's second text, the QA context);
        character offsets of the windowed text are shifted by ``shift``."""
        from bertexport.core.tasks import Window

        tok = self.art.encoder.tokenizer
        tok.enable_truncation(max_length=self.max_length, stride=self.stride,
                              strategy="only_second" if pairs is not None else "longest_first")
        items = list(zip(texts, pairs)) if pairs is not None else list(texts)
        out = []
        for i, enc in enumerate(tok.encode_batch(items)):
            for e in [enc, *enc.overflowing]:
                seq = list(e.sequence_ids)
                windowed = 1 if pairs is not None else 0
                offsets = [(a + shift, b + shift) if sid == windowed and shift else (a, b)
                           for (a, b), sid in zip(e.offsets, seq)]
                out.append(Window(i, list(e.ids), list(e.type_ids), offsets, list(e.special_tokens_mask), seq))
        return out

    def _run(self, windows) -> list:
        """Each window's outputs, trimmed to its length and reduced per task, batched by length."""
        order = sorted(range(len(windows)), key=lambda k: len(windows[k].ids))
        results: list = [None] * len(windows)
        names = self.art.encoder.input_names
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            width = max(len(windows[k].ids) for k in idx)
            feeds = {"input_ids": np.full((len(idx), width), self.art.encoder.pad_id, dtype=np.int64),
                     "attention_mask": np.zeros((len(idx), width), dtype=np.int64),
                     "token_type_ids": np.zeros((len(idx), width), dtype=np.int64)}
            for r, k in enumerate(idx):
                w = windows[k]
                n = len(w.ids)
                feeds["input_ids"][r, :n] = w.ids
                feeds["attention_mask"][r, :n] = 1
                feeds["token_type_ids"][r, :n] = w.type_ids
            out = self.art.infer({n: feeds[n] for n in names}, self.exit_threshold)
            for r, k in enumerate(idx):
                n = len(windows[k].ids)
                raw = {name: (v[r, :n] if self.task.per_token else v[r]) for name, v in out.items()}
                results[k] = self.task.reduce(windows[k], raw, self.post)
        return results

    def predict(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise UserError("empty text: every input needs at least one non-space character")
        if self.task.needs_pair and pairs is None:
            raise UserError(f"{self.task.name} needs (question, context) pairs")
        reduced: dict[int, list] = {i: [] for i in range(len(texts))}
        long_ones = [i for i in range(len(texts)) if len((pairs or texts)[i]) > SEGMENT_CHARS]
        short = [i for i in range(len(texts)) if i not in set(long_ones)]
        if short:  # all short texts together: their windows batch across texts
            wins = self.windows([texts[i] for i in short], [pairs[i] for i in short] if pairs is not None else None)
            for w, r in zip(wins, self._run(wins)):
                reduced[short[w.text_index]].append(r)
        for i in long_ones:  # one segment at a time: bounded memory
            for start, piece in segments((pairs or texts)[i]):
                if pairs is not None:
                    wins = self.windows([texts[i]], [piece], shift=start)
                else:
                    wins = self.windows([piece], shift=start)
                reduced[i].extend(self._run(wins))
        return [self.task.aggregate(texts[i], pairs[i] if pairs is not None else None, reduced[i], self.post)
                for i in range(len(texts))]
