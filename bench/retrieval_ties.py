"""Why the embedding gate counts ties: retrieval agreement with and without a tie tolerance,
on real all-MiniLM-L6-v2 embeddings of short messages full of near-duplicates.

The corpus: 300 Rotten Tomatoes snippets cut to their first 3-6 words, each with one
variant (lower-cased, capitalised, "!" or "." added, "really " prepended) — 600 short
messages like a chat or SMS corpus. Reference: the fp32 ONNX export (parity with PyTorch
~4e-6). Candidates: ONNX Runtime dynamic int8 (per-tensor, per-channel, reduce_range) of
the same graph, bertexport's `ort-int8` artifact, and the reference with Gaussian noise of
known size (a stand-in for "an artifact whose embeddings keep cosine >= 0.998").

    .venv/bin/python bench/retrieval_ties.py            # prints a Markdown table

Needs the bench data (bench/rotten_tomatoes.py fetches it) and builds artifacts in the
bertexport cache; nothing is timed.
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rotten_tomatoes import rotten_tomatoes_rows  # noqa: E402
from bertexport.core.cache import cache_dir  # noqa: E402
from bertexport.judging.compare import RETRIEVAL_TOLERANCE, retrieval_kept  # noqa: E402
from bertexport.building.convert import convert  # noqa: E402
from bertexport.shipping.runtime import Artifact  # noqa: E402


def short_messages(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for row in rng.sample(rotten_tomatoes_rows(), n):
        words = row["text"].split()
        base = " ".join(words[:rng.randint(3, 6)])
        texts += [base, rng.choice([base.lower(), base + "!", base + ".", base.capitalize(), "really " + base])]
    return texts


def embed(model_path: Path, art: Artifact, texts: list[str]) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    out = []
    for t in texts:  # one text at a time: no batch effects in this comparison
        feeds = art.encoder.encode([t], padding="longest")
        h = sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]
        m = feeds["attention_mask"][..., None]
        out.append((h * m).sum(1)[0] / m.sum())
    return np.array(out)


def main() -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    texts = short_messages()
    root = cache_dir("bench", "retrieval-ties")
    ref_art = convert("builtin:all-MiniLM-L6-v2", "ort-fp32", root / "fp32", force=True, latency_runs=0).artifact
    a = Artifact(ref_art)
    src = ref_art / a.manifest["model"]["path"]
    ref = embed(src, a, texts)
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in {"ORT dynamic int8, per-tensor": dict(per_channel=False),
                         "ORT dynamic int8, per-channel": dict(per_channel=True),
                         "ORT dynamic int8, per-tensor, reduce_range": dict(per_channel=False, reduce_range=True)}.items():
            dst = Path(tmp) / "q.onnx"
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, **kw)
            variants[name] = embed(dst, a, texts)
    q_art = convert("builtin:all-MiniLM-L6-v2", "ort-int8", root / "ort-int8", force=True, latency_runs=0).artifact
    qa = Artifact(q_art)
    variants["bertexport `ort-int8` (this CPU's preset)"] = embed(q_art / qa.manifest["model"]["path"], qa, texts)
    rng = np.random.default_rng(0)
    for eps in (1e-3, 3e-3, 1e-2):
        scale = np.linalg.norm(ref, axis=1, keepdims=True) * eps
        variants[f"reference + Gaussian noise {eps:g}"] = ref + rng.normal(size=ref.shape) * scale
    tols = (0.0, 0.005, RETRIEVAL_TOLERANCE, 0.02)
    print(f"{len(texts)} short messages (near-duplicate pairs), top-5 neighbours, all-MiniLM-L6-v2\n")
    print("| candidate | cosine min | cosine mean | " + " | ".join(f"agreement, tolerance {t:g}" for t in tols) + " |")
    print("|---|---|---|" + "---|" * len(tols))
    for name, v in variants.items():
        cos = (ref * v).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(v, axis=1)
        kept = [retrieval_kept(list(ref), list(v), 5, t).mean() for t in tols]
        print(f"| {name} | {cos.min():.4f} | {cos.mean():.5f} | " + " | ".join(f"{k:.3f}" for k in kept) + " |")


if __name__ == "__main__":
    main()
