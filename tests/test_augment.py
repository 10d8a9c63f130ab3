"""Text variants for teacher-labelled expansion: deterministic by seed, never a copy of an
input (or an excluded) text, no duplicates, never longer than the source, words from the
data's own vocabulary."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bertexport.students.augment import variants
from tests.tinymodels import keyword_sentence


@pytest.fixture(scope="module")
def texts():
    rng = np.random.default_rng(5)
    out = [keyword_sentence(rng, int(rng.integers(3, 16)), "excellent" if rng.random() < 0.5 else None) for _ in range(60)]
    return out + ["The plot, honestly, was thin.", "Great!", "这部电影非常好看"]


def _core(word):
    return re.sub(r"^\W+|\W+$", "", word).lower()


def test_deterministic_by_seed(texts):
    a, b, c = variants(texts, 4, seed=1), variants(texts, 4, seed=1), variants(texts, 4, seed=2)
    assert a == b
    assert a != c
    assert variants(texts, 0, seed=1) == []


def test_variants_are_new_distinct_and_bounded(texts):
    sources: list[int] = []
    held_out = {keyword_sentence(np.random.default_rng(9), 6, None)}
    out = variants(texts, 5, seed=0, exclude=held_out, sources=sources)
    assert len(out) == len(sources) and len(out) >= 4 * len(texts)  # nearly every text gets its variants
    assert len(set(out)) == len(out)  # no duplicates
    assert not set(out) & (set(texts) | held_out)  # never an input or an excluded text
    per_source = np.bincount(sources, minlength=len(texts))
    assert per_source.max() <= 5
    vocab = {_core(w) for t in texts for w in t.split()}
    for v, i in zip(out, sources):
        src = texts[i]
        assert v != src
        if len(src.split()) > 1:
            assert len(v.split()) <= len(src.split())  # bounded: never more words than the source
            assert {_core(w) for w in v.split()} <= vocab  # replacements come from the data's own words
        else:
            assert len(v) <= max(len(src), max(len(w) for w in vocab))
    chinese = [v for v, i in zip(out, sources) if texts[i] == "这部电影非常好看"]
    assert chinese and all(v in "这部电影非常好看" or v in vocab for v in chinese)  # crops of a text without spaces


def test_variants_keep_most_of_their_source(texts):
    """A variant is near its source (the teacher labels inputs near the data): for texts of
    5+ words at least half the words survive in order-free overlap."""
    sources: list[int] = []
    out = variants(texts, 3, seed=0, sources=sources)
    for v, i in zip(out, sources):
        src = texts[i].split()
        if len(src) >= 5:
            overlap = sum(min(v.split().count(w), src.count(w)) for w in set(src))
            assert overlap >= len(src) // 2, (texts[i], v)


def test_a_replacement_is_drawn_by_count_from_its_context_never_the_word_itself():
    """Between the same neighbours the data used "good" 3 times, "fine" once, "bad" twice:
    replacing "bad" draws "good" and "fine" about 3:1, never "bad"; a pool holding only the
    word itself falls back to a wider one."""
    import random

    from bertexport.students.augment import _Contexts

    ctx = _Contexts(["a good film"] * 3 + ["a fine film", "a bad film", "a bad film", "only once"])
    rng = random.Random(0)
    draws = [ctx.substitute(rng, "bad", "a", "film") for _ in range(4000)]
    assert set(draws) == {"good", "fine"}
    assert 2.6 < draws.count("good") / draws.count("fine") < 3.4
    assert ctx.substitute(rng, "once", "only", "</s>") == "film"  # no other word after "only": one before the end
