"""The builds a student is tried with: the fastest int8 recipes measured on the original
(``fastest_bases``), each with first-token skipping where the task allows it
(``skip_supported``) and int8 word embeddings (``student_candidates``)."""

from __future__ import annotations

import dataclasses

from bertexport.core.errors import UserError
from bertexport.search.candidates import Candidate


def _pass_known(name: str) -> bool:
    """Whether this installation has the pass (registered and its module present)."""
    import importlib.util

    from bertexport.building.passes.base import CATALOG

    return name in CATALOG and importlib.util.find_spec(CATALOG[name]) is not None


def skip_supported(task: str, family: str, config: dict) -> bool:
    """First-token skipping applies to text classification with a first-token pooler
    (``passes.first_token_skip.check_supported``)."""
    if task != "text-classification" or not _pass_known("first-token-skip"):
        return False
    from bertexport.building.passes.first_token_skip import check_supported

    try:
        check_supported(family, task, config)
    except UserError:
        return False
    return True


def student_candidates(shape, bases: list[Candidate], skip: bool) -> list[Candidate]:
    """The student's builds: each base recipe with first-token skipping first (where the
    task allows it) and int8 word embeddings (both ONNX passes, before the backend's)."""
    skip = getattr(shape, "skip", skip)  # a --student-init checkpoint (InitShape): its own family decides
    out = []
    emb8 = _pass_known("int8-embeddings")
    for base in bases:
        pre, suffix = [], ""
        if skip:
            pre.append({"type": "first-token-skip"})
            suffix += "+skip"
        if emb8:
            pre.append({"type": "int8-embeddings"})
            suffix += "+emb8"
        out.append(dataclasses.replace(base, recipe=base.recipe + suffix, passes=pre + [dict(p) for p in base.passes],
                                       keep_float=[], anchor=False, student=shape.name, student_layers=shape.layers))
    return out


def fastest_bases(trials, recipes: list[Candidate], count: int = 2) -> list[tuple[Candidate, float | None]]:
    """The ``count`` fastest int8 recipes measured on the original (quick latency), with that
    latency; recipes not yet measured follow in the machine's order."""
    measured: dict[str, tuple[Candidate, float]] = {}
    for t in trials:
        c = t.candidate
        if c.student or c.student_layers or c.pruned or c.early_exit or c.keep_float or t.latency_ms is None or not c.int8 or t.status == "excluded":
            continue
        if c.recipe not in measured or t.latency_ms < measured[c.recipe][1]:
            measured[c.recipe] = (c, t.latency_ms)
    out = sorted(measured.values(), key=lambda x: x[1])[:count]
    for c in recipes:
        if len(out) >= count:
            break
        if c.int8 and c.recipe not in measured:
            out.append((c, None))
    return out
