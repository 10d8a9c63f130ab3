"""Turn text into the exact feed dict a compiled model takes.

Only the model's own inputs are fed; a tokenizer that returns no token_type_ids for a
model that takes them (optimum#1758: BertModel with an XLM-R tokenizer) gets zeros,
which is what the PyTorch model uses by default."""

from __future__ import annotations

from typing import Callable

import numpy as np


def make_encoder(tokenizer, input_names: list[str], max_length: int) -> Callable[..., dict[str, np.ndarray]]:
    """``encode(texts, padding="longest"|"max_length", length=None, pairs=None)`` -> feeds."""

    def encode(texts, padding: str = "longest", length: int | None = None, pairs=None):
        length = min(length or max_length, max_length)
        enc = tokenizer(
            list(texts),
            list(pairs) if pairs is not None else None,
            padding=padding,
            truncation=True,
            max_length=length,
            return_tensors="np",
        )
        feeds = {}
        for name in input_names:
            if name in enc:
                feeds[name] = enc[name].astype(np.int64)
            elif name == "token_type_ids":
                feeds[name] = np.zeros_like(enc["input_ids"], dtype=np.int64)
            else:
                raise ValueError(f"the tokenizer produces no '{name}', which the model takes")
        return feeds

    return encode


def model_max_length(config: dict, tokenizer=None) -> int:
    """The longest sequence the model accepts (position embeddings, minus RoBERTa's offset)."""
    n = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
        n -= (config.get("pad_token_id") or 1) + 1
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 10**6:
        n = min(n, int(tok_max))
    return n
