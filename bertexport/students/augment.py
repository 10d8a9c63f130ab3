"""Text variants for teacher-labelled data expansion (``distill`` on small data).

``variants(texts, per_text, seed)`` returns new texts made from ``texts``; the teacher labels
them and the student learns the teacher's soft outputs on them (TinyBERT: on SST-2, 20
variants per example took a 4-layer student from 89.3-90.7 with logit KD to 91.5). The
variants only need to be plausible inputs near the data, not correct paraphrases: whatever
they mean, the teacher says what it thinks of them and the student copies that.

Method (no model, no download, nothing from a hub at run time), per variant one of:

- **word replacement** (TinyBERT-style, 30 % of the words, at least one): each is replaced by a word seen
  in the same context *in this data* — same left and right neighbour first, else same left
  or same right neighbour, else a frequent word of the data, drawn by count. TinyBERT draws
  from a masked-LM or GloVe neighbours; both need model files, and the teacher here is a
  task head without a masked-LM head. Context substitutes from the data itself keep the
  vocabulary, language and register of the user's texts (any language that separates words
  with spaces);
- **random deletion** (EDA, 10 % of the words, at least one, never all);
- **random swap** (EDA, about one swap per 10 words, at least one);
- **span crop**: a contiguous 50-90 % of the words (texts without spaces, e.g. Chinese or
  Japanese: of the characters).

EDA's synonym replacement and insertion need WordNet (an NLTK download, English only), so
they are left out. nlpaug (its RandomWordAug / SplitAug would fit) was not used: its last
release is from 2022, it pulls in pandas/gdown/requests for these few lines, and it draws
from the global random state; its model-based augmenters need downloads.

Promises: deterministic for a given (texts, per_text, seed); a variant never equals its
source text nor any text of the input (so a held-out text can't come back as a training
variant when the caller passes it in ``exclude``); no duplicate variants; a variant never
has more words (or, unsplit, characters) than its source. A text too short to vary (one
word, no substitute) gets fewer variants, possibly none.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter, defaultdict

_EDGE = re.compile(r"^(\W*)(.*?)(\W*)$", re.S)
REPLACE_P = 0.3
DELETE_P = 0.1
_TRIES = 6  # attempts per wanted variant before giving up on a text


def _core(word: str) -> tuple[str, str, str]:
    m = _EDGE.match(word)
    return m.group(1), m.group(2), m.group(3)


class _Contexts:
    """Which words the data uses between which neighbours (lower-cased cores)."""

    def __init__(self, texts: list[str]):
        self.both: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self.left: dict[str, Counter] = defaultdict(Counter)
        self.right: dict[str, Counter] = defaultdict(Counter)
        counts: Counter = Counter()
        for text in texts:
            cores = [_core(w)[1].lower() for w in text.split()]
            for i, w in enumerate(cores):
                if not w:
                    continue
                left = cores[i - 1] if i else "<s>"
                right = cores[i + 1] if i + 1 < len(cores) else "</s>"
                self.both[(left, right)][w] += 1
                self.left[left][w] += 1
                self.right[right][w] += 1
                counts[w] += 1
        self.frequent = Counter(dict(counts.most_common(2000)))
        self._draws: dict[tuple, tuple[tuple[str, ...], list[int]]] = {}

    def _pool(self, key: tuple, pool: Counter) -> tuple[tuple[str, ...], list[int]]:
        """A pool's words (sorted: independent of insertion order) and cumulative counts, built
        once: a common neighbour's pool holds thousands of words, and long texts ask it thousands
        of times (sorting it per draw took a search 20 minutes on 3,355 news articles)."""
        got = self._draws.get(key)
        if got is None:
            words = tuple(sorted(pool))
            got = self._draws[key] = (words, list(itertools.accumulate(pool[w] for w in words)))
        return got

    def substitute(self, rng: random.Random, word: str, left: str, right: str) -> str | None:
        """A word drawn by count from the words seen between the same neighbours (else beside
        one of them, else among the data's frequent words), never ``word`` itself."""
        for key, pool in ((("both", left, right), self.both.get((left, right))), (("left", left), self.left.get(left)),
                          (("right", right), self.right.get(right))):
            if pool and (len(pool) > 1 or word not in pool):
                break
        else:
            key, pool = ("frequent",), self.frequent
        if not pool or (len(pool) == 1 and word in pool):
            return None
        words, cumulative = self._pool(key, pool)
        while True:  # by count among the pool's other words: redraw on the word itself
            new = rng.choices(words, cum_weights=cumulative)[0]
            if new != word:
                return new


def _replace(rng: random.Random, words: list[str], ctx: _Contexts) -> list[str]:
    cores = [_core(w)[1].lower() for w in words]
    out = list(words)
    candidates = [i for i, c in enumerate(cores) if c]
    for i in rng.sample(candidates, min(len(candidates), max(1, round(REPLACE_P * len(words))))):
        pre, core, post = _core(words[i])
        new = ctx.substitute(rng, cores[i], cores[i - 1] if i else "<s>", cores[i + 1] if i + 1 < len(cores) else "</s>")
        if new:
            out[i] = pre + (new[:1].upper() + new[1:] if core[:1].isupper() else new) + post
    return out


def _delete(rng: random.Random, words: list[str]) -> list[str]:
    gone = set(rng.sample(range(len(words)), min(len(words) - 1, max(1, round(DELETE_P * len(words))))))
    return [w for i, w in enumerate(words) if i not in gone]


def _swap(rng: random.Random, words: list[str]) -> list[str]:
    out = list(words)
    for _ in range(max(1, len(words) // 10)):
        i, j = rng.sample(range(len(words)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def _crop(rng: random.Random, units: list) -> list:
    n = len(units)
    size = max(1, min(n - 1, int(round(n * rng.uniform(0.5, 0.9)))))
    start = rng.randrange(n - size + 1)
    return units[start:start + size]


def _variant(rng: random.Random, text: str, ctx: _Contexts) -> str:
    words = text.split()
    if len(words) < 2:  # one word, or a language written without spaces
        if len(words) == 1 and rng.random() < 0.5:
            pre, core, post = _core(words[0])
            new = ctx.substitute(rng, core.lower(), "<s>", "</s>") if core else None
            return pre + new + post if new else text
        chars = list(text.strip())
        return "".join(_crop(rng, chars)) if len(chars) >= 4 else text
    op = rng.choice(("replace", "replace", "delete", "swap", "crop"))  # replacement is TinyBERT's main tool
    if op == "replace":
        new = _replace(rng, words, ctx)
    elif op == "delete":
        new = _delete(rng, words)
    elif op == "swap":
        new = _swap(rng, words)
    else:
        new = _crop(rng, words)
    return " ".join(new)


def variants(texts: list[str], per_text: int, seed: int, exclude: set[str] | None = None,
             sources: list[int] | None = None) -> list[str]:
    """Up to ``per_text`` variants of each text, in text order (all variants of text 0,
    then of text 1, ...). ``exclude``: texts a variant must never equal (besides the input
    texts themselves). ``sources`` (optional, filled in place): the index of each variant's
    source text."""
    if per_text < 0:
        raise ValueError("per_text must be >= 0")
    ctx = _Contexts(texts)
    taken = set(texts) | set(exclude or ())
    out: list[str] = []
    for i, text in enumerate(texts):
        rng = random.Random(f"{seed}:{i}:{text}")  # per text: a text's variants don't depend on the others' order
        made = 0
        for _ in range(per_text * _TRIES):
            if made == per_text:
                break
            v = _variant(rng, text, ctx).strip()
            if not v or v in taken:
                continue
            taken.add(v)
            out.append(v)
            if sources is not None:
                sources.append(i)
            made += 1
    return out
