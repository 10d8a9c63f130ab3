"""The model families and tasks bertexport compiles, and how a checkpoint maps to them."""

from __future__ import annotations

from dataclasses import dataclass

TASKS = (
    "feature-extraction",
    "text-classification",
    "token-classification",
    "question-answering",
    "fill-mask",
)

# Architecture-name suffix -> task. Order matters: the first suffix that matches wins.
_ARCH_SUFFIX_TO_TASK = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForPreTraining", "fill-mask"),
    ("Model", "feature-extraction"),
)


@dataclass(frozen=True)
class Family:
    model_type: str
    display: str
    tokenizer_kind: str  # wordpiece | bpe | sentencepiece


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("bert", "BERT (incl. MiniLM, TinyBERT)", "wordpiece"),
        Family("distilbert", "DistilBERT", "wordpiece"),
        Family("roberta", "RoBERTa", "bpe"),
        Family("xlm-roberta", "XLM-RoBERTa", "sentencepiece"),
        Family("camembert", "CamemBERT", "sentencepiece"),
        Family("albert", "ALBERT", "sentencepiece"),
        Family("electra", "ELECTRA", "wordpiece"),
        Family("deberta-v2", "DeBERTa-v2/v3", "sentencepiece"),
        Family("mpnet", "MPNet", "wordpiece"),
        Family("mobilebert", "MobileBERT", "wordpiece"),
    )
}


def supported_families_text() -> str:
    return ", ".join(FAMILIES)


def task_from_architectures(architectures: list[str] | None) -> str | None:
    """The task a checkpoint's trained head serves, from ``config.architectures``."""
    for arch in architectures or ():
        for suffix, task in _ARCH_SUFFIX_TO_TASK:
            if arch.endswith(suffix):
                return task
    return None


def tasks_served(detected: str | None) -> tuple[str, ...]:
    """Tasks a checkpoint can serve without a random-init head: its own, plus embeddings
    from its encoder (every checkpoint has one)."""
    if detected is None or detected == "feature-extraction":
        return ("feature-extraction",)
    return (detected, "feature-extraction")
