"""Which students ``optimize`` tries and in which order.

- ``plan_students`` turns ``--distill`` into checked shapes before any work: ``auto`` is the
  depth x width grid (``student_grid``), ``3,4`` layer-drop students at full width, and
  ``L3-H256-F1024,L2`` explicit shapes (``students.parse_shape``; missing parts are the
  teacher's). A shape the family cannot take is refused here (exit 2).
- ``--student-init`` checkpoints (``plan_init_students``: pre-trained smaller models sharing the
  teacher's vocabulary, checked before any work by ``students.pretrained``) join the shapes as
  ``InitShape``s named by what they are (``init:minilm-l3 L3-H384``), never dominated.
- A checkpoint ``optimize --prune`` made that missed the gate (``pruned_students``) joins them
  too, as a ``PrunedShape`` (``pruned 0.6 MACs + distilled``): the same path as
  ``--student-init`` (the pruned model keeps the teacher's vocabulary and task head), never
  dominated.
- The search bisects over them by predicted latency (``next_shape``; pre-trained
  ``--student-init`` checkpoints first, then the shapes that keep the teacher's hidden size: the
  students most likely to pass; after a pass with room to spare, the fastest shape next) and
  never trains a shape no larger in any dimension than a student that missed the gate
  (``dominated``).
"""

from __future__ import annotations

import math

from bertexport.core.errors import UserError
from bertexport.search.student_builds import skip_supported
from bertexport.students.shapes import StudentShape

GRID_MAX = 12  # shapes in the ``auto`` grid at most


def teacher_config(ckpt):
    """The teacher's transformers config, read from its folder (no weights loaded)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(ckpt.path, trust_remote_code=ckpt.trust_remote_code)


def _whole(value: float) -> int:
    return max(1, int(round(value)))


def student_grid(teacher, family: str, cap: int = GRID_MAX, config=None) -> list:
    """``--distill auto``: depths {L/2, L/3, 2} (below the teacher's) x widths {the teacher's,
    2/3, 1/2 of its heads (the hidden size goes with them)} x FFN {the teacher's, 1/2, 1/4},
    keeping an FFN no wider (relative to the hidden size) than the teacher's and at least half
    the hidden size, only shapes ``students.check_shape`` accepts; at most ``cap`` shapes:
    where more, the shapes whose MACs are nearest another's are dropped first. Then, beyond the
    cap, one layer at the teacher's hidden size (each FFN width) when 1 is not already a depth:
    on two topic tasks a 1-layer full-width student held the 1-point gate on the untouched rows
    at 1.6-2x the 2-layer one's speed, given the training texts (docs/measurements.md, "A 1-layer
    student holds the topic point", "A second topic task no setting was tuned on"); narrower
    1-layer shapes are left out (every narrower student missed by 2-13 points, "Full-width
    students first"). Where it misses, bisection and ``dominated`` rule it out for a training at
    most."""
    from bertexport.search.cost_model import linear_macs
    from bertexport.students.shapes import StudentShape, check_shape, width_prunable

    n, head = teacher.layers, teacher.hidden // teacher.heads
    depths = sorted({d for d in (n // 2, n // 3, 2) if 1 <= d < n} or {max(1, n - 1)}, reverse=True)
    if width_prunable(family) and (family != "electra" or config is None
                                   or getattr(config, "embedding_size", teacher.hidden) == teacher.hidden):
        heads = sorted({_whole(teacher.heads * f) for f in (1.0, 2 / 3, 1 / 2)}, reverse=True)
        ffns = sorted({_whole(teacher.ffn * f) for f in (1.0, 1 / 2, 1 / 4)}, reverse=True)
    else:
        heads, ffns = [teacher.heads], [teacher.ffn]
    widest = teacher.ffn / teacher.hidden

    def shapes_of(d: int, widths: list) -> list:
        out = []
        for a in widths:
            h = a * head
            for f in ffns:
                if (f > widest * h + 1e-9 or 2 * f < h) and (h, f) != (teacher.hidden, teacher.ffn):
                    continue
                shape = StudentShape(d, h, a, f)
                try:
                    check_shape(shape, teacher, family, config)
                except UserError:
                    continue
                out.append(shape)
        return out

    shapes = sorted({s for d in depths for s in shapes_of(d, heads)}, key=lambda s: linear_macs(s, 1, 1))
    while len(shapes) > cap:  # drop the shape nearest (in log MACs) to its cheaper neighbour, never the ends
        logs = [math.log(linear_macs(s, 1, 1)) for s in shapes]
        i = min(range(1, len(shapes) - 1), key=lambda k: logs[k] - logs[k - 1])
        shapes.pop(i)
    if 1 not in depths and n > 1:  # one layer at the teacher's width, beyond the cap (see above)
        shapes = sorted(set(shapes) | set(shapes_of(1, heads[:1])), key=lambda s: linear_macs(s, 1, 1))
    return shapes


def plan_students(distill, ckpt) -> list:
    """``--distill`` as checked shapes (empty: no students). ``auto``: the grid; integers
    (``3,4`` or a list): layer-drop students at full width; ``L3-H256-F1024,L2``: shapes."""
    if not distill:
        return []
    from bertexport.core.families import get_family

    fam = get_family(ckpt.family)
    n = int(fam.config_value(ckpt.config, fam.layers_key, 0))
    items = list(distill) if isinstance(distill, (list, tuple)) else [x.strip() for x in str(distill).split(",") if x.strip()]
    if not items:
        return []
    depths = [x for x in items if isinstance(x, int) or str(x).lstrip("-").isdigit()]
    if depths and len(depths) == len(items):  # the layer-drop form, checked as it always was
        layers = [int(x) for x in depths]
        if any(k < 1 for k in layers):
            raise UserError("--distill layer counts must be >= 1")
        too_deep = sorted({k for k in layers if k >= n})
        if too_deep:
            raise UserError(f"--distill {','.join(map(str, too_deep))}: the model has {n} layers; a student needs fewer "
                            f"(1..{n - 1})")
        items = [f"L{k}" for k in sorted(set(layers))]
    from bertexport.students.shapes import check_shape, parse_shape, teacher_shape

    config = teacher_config(ckpt)
    teacher = teacher_shape(config)
    if items == ["auto"]:
        shapes = student_grid(teacher, ckpt.family, config=config)
        if not shapes:
            raise UserError(f"--distill auto: no student shape fits a {n}-layer {ckpt.family} model")
        return shapes
    if "auto" in items:
        raise UserError("--distill auto cannot be combined with other shapes")
    shapes = []
    for text in items:
        shape = parse_shape(str(text), teacher)
        check_shape(shape, teacher, ckpt.family, config)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


class InitShape(StudentShape):
    """A ``--student-init`` checkpoint (``students.pretrained.InitStudent``) as the search sees
    it: its shape, named by what it is (``init:minilm-l3 L3-H384``), trained and judged like the
    shapes sliced from the teacher, never counted as dominated by (or dominating) them: its
    weights come from elsewhere. ``init`` and ``skip`` (whether first-token skipping applies to
    its family) are set by ``init_shape``; they are not dataclass fields, so its record is a shape's."""

    init = None
    skip = False

    @property
    def name(self) -> str:
        return self.init.name

    def __eq__(self, other):
        return isinstance(other, InitShape) and other.init.path == self.init.path

    def __hash__(self):
        return hash(str(self.init.path))


def init_shape(init, skip: bool) -> InitShape:
    shape = InitShape(init.shape.layers, init.shape.hidden, init.shape.heads, init.shape.ffn)
    object.__setattr__(shape, "init", init)
    object.__setattr__(shape, "skip", skip)
    return shape


def plan_init_students(sources, ckpt, texts=()) -> list:
    """``--student-init`` checkpoints, checked against the teacher before any work (vocabulary,
    family, size, task: ``students.pretrained.check_student_init``), as ``InitShape``s."""
    from bertexport.students.pretrained import check_student_init

    shapes: list = []
    for source in sources or ():
        init = check_student_init(str(source), ckpt, list(texts))
        shape = init_shape(init, skip_supported(ckpt.task, init.family, init.config))
        if shape not in shapes:
            shapes.append(shape)
    return shapes


class PrunedShape(InitShape):
    """A checkpoint ``optimize --prune`` made (the original pruned to ``budget`` of its MACs,
    no training) as a student to distil: an ``InitShape`` whose init is that folder, named
    ``pruned 0.6 MACs + distilled``; ``pruned`` is its pruning record (budget, checkpoint,
    agreement). Set by ``pruned_students``."""

    budget = None
    pruned = None

    @property
    def name(self) -> str:
        return f"pruned {self.budget:g} MACs + distilled"


def pruned_students(pruning: dict | None, ckpt, tokenizer=None, log=print) -> list:
    """The pruned checkpoints of ``optimize --prune`` (its report section) that missed the gate,
    as ``PrunedShape``s, checked like ``--student-init`` checkpoints (configs and tokenizers).
    One that passed is not distilled: training keeps its shape, so it cannot get faster."""
    from bertexport.students.pretrained import check_student_init

    shapes: list = []
    for r in (pruning or {}).get("records") or []:
        if r.get("status") != "not passed" or not r.get("checkpoint"):
            continue
        try:
            init = check_student_init(str(r["checkpoint"]), ckpt, teacher_tokenizer=tokenizer)
        except UserError as e:  # a pruned folder is ours: this is unexpected, but it must not end the search
            log(f"pruned {r['mac_budget']:g} MACs: not distilled ({e})")
            continue
        shape = PrunedShape(init.shape.layers, init.shape.hidden, init.shape.heads, init.shape.ffn)
        for k, v in (("init", init), ("skip", skip_supported(ckpt.task, init.family, init.config)),
                     ("budget", float(r["mac_budget"])), ("pruned", {k: r.get(k) for k in (
                         "mac_budget", "mac_fraction", "checkpoint", "agreement", "shape")})):
            object.__setattr__(shape, k, v)
        shapes.append(shape)
    return shapes


def next_shape(pending: list, hidden: int | None = None, fastest: bool = False):
    """The next student to train: the middle of the untried shapes (ordered by predicted
    latency) of the first tier that has any. Accuracy grows with size roughly monotonically,
    so within a tier this bisects: a pass makes every slower shape hopeless, a miss rules out
    the shapes it dominates (``dominated``), and the fastest passing shape is found in ~log2(n)
    trainings instead of n (fastest-first spends the budget on the smallest shapes, which miss
    the gate first).

    ``fastest``: the fastest shape of that tier instead of its middle, when the student just judged
    passed with room to spare (``search.students``: it reached the agreement that keeps the gate with
    half its allowance unused, ``stopped: target``): the boundary is then likely far below it, and
    the smallest shapes need the most epochs, so they are the ones that must start while the budget
    is large. Measured on Reuters R8 (2026-12-05): the 3-layer student stopped at that target after
    3.5 epochs; the middle shape next (2-layer, passed at 5.2 epochs) left the 1-layer one 5.0 of
    the ~7.7 epochs it needed to pass.

    The tiers, most likely to pass first (a pass makes the slower shapes of later tiers hopeless
    before any of them trains):
    1. pre-trained ``--student-init`` checkpoints. Measured (docs/measurements.md, "The lever table
       again"): a pre-trained MiniLM-L3 distilled lost +0.76 points where a 3-layer layer-drop
       student of the same width lost +1.22 and the search's narrower ones 2.5-6.5; the literature
       agrees (PKD vs TinyBERT/MiniLM, ../shared/REFERENCES.md "Students, round 2").
    2. shapes sliced from the teacher that keep its hidden size (``hidden``: layer drop, the FFN
       perhaps narrower). Measured on two machines and two tasks (docs/measurements.md, "Full-width
       students first"): every student narrower than the teacher's hidden size (H192, H256 of a
       MiniLM's 384) missed the gate, by 2-13 points; every full-width 3-layer one passed at least
       once, the full-width 2-layer ones were borderline (RT +1.04 and +1.38 on 2,025 rows); bisecting
       all shapes by latency alone started with the narrow ones and spent a 28-minute budget on them.
    3. the rest: narrower shapes, and the pruned originals (``PrunedShape``: they start close to the
       gate but slow), by latency."""
    tiers = ([s for s in pending if isinstance(s, InitShape) and not isinstance(s, PrunedShape)],
             [s for s in pending if not isinstance(s, InitShape) and hidden is not None and s.hidden >= hidden])
    pool = next((t for t in tiers if t), pending)
    return pool[0] if fastest else pool[len(pool) // 2]


# a shape whose larger neighbour is predicted no more than this much slower is never trained
# (``outsized``): the prediction's own error is larger than the difference
SAME_COST = 0.05


def outsized(shapes: list, ratio: dict) -> dict:
    """The shapes sliced from the teacher that a larger one makes pointless: for each, the largest
    other shape at least as large in depth, hidden size and FFN whose predicted latency (``ratio``:
    name -> x the teacher's) is within ``SAME_COST`` of its own; shape -> that shape. With
    first-token skipping a 1-layer student's FFN runs on the first token only, so its narrower
    FFNs cost what the teacher's width does (1.5 % of its linear MACs at 128 tokens) and would
    spend a training on a smaller model for no speed. ``--student-init`` and pruned checkpoints
    are never outsized (their weights come from elsewhere)."""
    sliced = [s for s in shapes if not isinstance(s, InitShape)]
    out = {}
    for s in sliced:
        larger = [b for b in sliced if b != s and dominated(s, b) and ratio[b.name] <= ratio[s.name] * (1 + SAME_COST)]
        if larger:
            out[s] = max(larger, key=lambda b: (b.layers, b.hidden, b.ffn))
    return out


def dominated(shape, missed) -> bool:
    """``shape`` is no larger than ``missed`` in depth, hidden size and FFN: expected no better
    (never said of a ``--student-init`` checkpoint, nor by one: its weights come from elsewhere)."""
    if isinstance(shape, InitShape) or isinstance(missed, InitShape):
        return False
    return shape.layers <= missed.layers and shape.hidden <= missed.hidden and shape.ffn <= missed.ffn
