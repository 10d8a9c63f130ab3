"""The gate registry: what a candidate must meet against the PyTorch original, one record
per gate, and the structured verdicts every command reports.

A gate record (``GateSpec``) is the only place that knows a gate's figure (its key in the
comparison figures), its direction, unit and display format, its CLI flag with the valid
range, the default ``optimize`` falls back to, how many rows its data needs before it can
be resolved, whether it needs labels, and whether it is judged with its paired interval
(``bertexport.judging.stats``). ``--confidence`` is one setting record (``CONFIDENCE``)
with one range for every command. The CLI flags are made from these records
(``gate_field``: the gate fields of the commands' settings records), ``Gates`` (the settings object callers pass around) takes its field
ranges from them, ``judge`` turns figures into ``Verdict`` records, and everything that
reports a verdict — convert's manifest, validate's JSON and JUnit, optimize and its
report — reads those records, never the wording of a message.

The one rule of the int8 target profiles (``PROFILE_RULES``) lives here too: see
docs/gates.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from bertexport.core.errors import UserError
from bertexport.core.options import option
from bertexport.judging import stats

# -- the records ------------------------------------------------------------------------------

PASSED, FAILED, UNDECIDED, WITHIN_NOISE = "passed", "failed", "undecided", "within-noise"


@dataclass(frozen=True)
class Setting:
    """A number a command takes, with its flag and valid range (``low``/``high`` inclusive
    unless ``low_open``/``high_open``)."""

    name: str
    flag: str
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return ("(" if self.low_open else "[") + f"{lo}, {hi}" + (")" if self.high_open or self.high is None else "]")

    def check(self, value: float | None, where: str = "") -> None:
        """``UserError`` (exit 2) when ``value`` is outside the range."""
        if value is None:
            return
        bad = (not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value)
               or (self.low is not None and (value <= self.low if self.low_open else value < self.low))
               or (self.high is not None and (value >= self.high if self.high_open else value > self.high)))
        if bad:
            raise UserError(f"{where or self.flag} must be in {self.range_text()}, got {value!r}")

    def field(self, default=None, help: str = ""):
        """A ``core.options`` dataclass field with this flag and range (profiles' [validation]
        tables, the gate fields of a command's settings record); ``help`` adds a sentence."""
        return option(default, f"{self.help} {help}".strip(), min=self.low, max=self.high, min_open=self.low_open,
                      max_open=self.high_open, flag=self.flag)


@dataclass(frozen=True)
class GateSpec(Setting):
    """One gate. ``direction``: ``min`` (the figure must be >= the threshold) or ``max``
    (<=). ``perfect``: the figure of a candidate identical to the original; with
    ``resolution`` (how far one row of N moves the figure, times N) it gives the rows the
    gate needs (``rows_needed``). ``interval``: judged with the paired interval of its
    figure when the figures carry one (``figures['stats'][metric]``)."""

    metric: str = ""
    what: str = ""
    direction: str = "min"
    unit: str = ""
    fmt: str = ".4f"
    perfect: float | None = None
    resolution: float | None = None
    interval: bool = False
    needs_labels: bool = False
    default: float | None = None
    default_when: str | None = None  # "labelled" / "unlabelled": when optimize falls back to ``default``
    tasks: tuple[str, ...] | None = None  # the only tasks whose figures carry it (None: every task)

    def show(self, value: float) -> str:
        return format(value, self.fmt)

    def outside(self, value: float, threshold: float) -> bool:
        """The figure misses the threshold."""
        return value < threshold if self.direction == "min" else value > threshold

    @property
    def op(self) -> str:
        return "<" if self.direction == "min" else ">"

    def rows_needed(self, threshold: float | None) -> int | None:
        """Rows so that one row moves the figure by at most half the gate's slack (agreement
        0.98: 100 rows; an accuracy drop of 1 point: 200 rows); None: no rows rule."""
        if threshold is None or self.resolution is None or self.perfect is None:
            return None
        slack = abs(self.perfect - threshold)
        if slack <= 0:
            return None  # an exact gate (e.g. agreement 1.0): any difference decides it
        return stats.rows_to_resolve(slack, self.resolution)

    def to_dict(self) -> dict:
        return asdict(self) | {"range": self.range_text()}


GATES: dict[str, GateSpec] = {g.name: g for g in (
    GateSpec("max_accuracy_drop", "--max-accuracy-drop",
             "Gate: the labelled task metric (accuracy; embeddings: retrieval precision@5) may drop at most this many points.",
             low=0.0, metric="metric_drop", what="accuracy drop", direction="max", unit="points", fmt=".2f",
             perfect=0.0, resolution=100.0, interval=True, needs_labels=True, default=1.0, default_when="labelled"),
    GateSpec("max_macro_f1_drop", "--max-macro-f1-drop",
             "Gate: macro-F1 (every class's F1 averaged, a rare class weighing as much as a common one) may drop at "
             "most this many points; for classes of very different sizes, where accuracy hides a lost rare class.",
             low=0.0, metric="macro_f1_drop", what="macro-F1 drop", direction="max", unit="points", fmt=".2f",
             perfect=0.0, interval=True, needs_labels=True, tasks=("text-classification",)),
    GateSpec("min_agreement", "--min-agreement",
             "Gate: fraction of decisions equal to PyTorch's (embeddings: tie-robust top-5 retrieval agreement).",
             low=0.0, high=1.0, metric="agreement", what="agreement", direction="min", fmt=".4f",
             perfect=1.0, resolution=1.0, interval=True, default=0.98, default_when="unlabelled"),
    GateSpec("min_cosine", "--min-cosine", "Gate: lowest per-sample cosine to PyTorch's outputs.",
             low=0.0, high=1.0, low_open=True, metric="cosine_min", what="cosine_min", direction="min", fmt=".5f"),
    GateSpec("max_abs_diff", "--max-abs-diff", "Gate: largest absolute output difference to PyTorch's.",
             low=0.0, low_open=True, metric="max_abs_diff", what="max_abs_diff", direction="max", fmt=".3g"),
)}

CONFIDENCE = Setting("confidence", "--confidence",
                     "Decide the gates on this interval (e.g. 0.95): pass only when the whole interval is inside the "
                     "threshold, fail only when it is entirely outside; otherwise UNDECIDED (with the rows needed).",
                     low=0.5, high=0.9999)


def gate(name: str) -> GateSpec:
    try:
        return GATES[name]
    except KeyError:
        raise KeyError(f"no gate called {name!r}; gates: {', '.join(GATES)}") from None


# -- the settings a caller passes -------------------------------------------------------------

@dataclass
class Gates:
    """What a candidate must meet against the reference. ``None``: not gated. The fields'
    ranges are the registry's."""

    min_cosine: float | None = GATES["min_cosine"].field()
    max_abs_diff: float | None = GATES["max_abs_diff"].field()
    min_agreement: float | None = GATES["min_agreement"].field()
    max_accuracy_drop: float | None = GATES["max_accuracy_drop"].field()
    max_macro_f1_drop: float | None = GATES["max_macro_f1_drop"].field()
    confidence: float | None = CONFIDENCE.field()

    def any(self) -> bool:
        return any(getattr(self, n) is not None for n in GATES)

    def given(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def thresholds(self) -> dict[str, float]:
        """The gates set, in registry order (``confidence`` is not a gate)."""
        return {n: getattr(self, n) for n in GATES if getattr(self, n) is not None}

    @property
    def level(self) -> float:
        """The interval level figures are reported at (the gate's, else 95 %)."""
        return self.confidence or stats.CONFIDENCE

    def check(self) -> "Gates":
        """Every value inside its registry range (``UserError`` otherwise)."""
        for n, spec in GATES.items():
            spec.check(getattr(self, n), spec.flag)
        CONFIDENCE.check(self.confidence, CONFIDENCE.flag)
        return self


def default_gates(labelled: bool) -> Gates:
    """The gate ``optimize`` uses when none is given (the registry's defaults)."""
    want = "labelled" if labelled else "unlabelled"
    return Gates(**{n: s.default for n, s in GATES.items() if s.default_when == want})


def implied_agreement(gates: Gates, margin: float) -> float | None:
    """The agreement with the original that keeps the gates with room to spare: 1 - ``margin`` x
    the smallest disagreement a gate allows (1 - ``min_agreement``; ``max_accuracy_drop`` points as
    a fraction of rows: a candidate that disagrees on fewer rows cannot lose more accuracy), at
    least 0.5. None when no gate bounds disagreement, or when one is set that agreement does not
    bound (``max_macro_f1_drop``: a rare class may hold all of the disagreement)."""
    if gates.max_macro_f1_drop is not None:
        return None
    allowed = [1.0 - gates.min_agreement] if gates.min_agreement is not None else []
    if gates.max_accuracy_drop is not None:
        allowed.append(gates.max_accuracy_drop / 100.0)
    if not allowed:
        return None
    return float(min(1.0, max(0.5, 1.0 - margin * max(min(allowed), 0.0))))


# -- verdicts ---------------------------------------------------------------------------------

@dataclass
class Verdict:
    """One gate judged on one set of figures. ``low``/``high``: the figure's interval when
    it was judged with one. ``status``: passed, failed, undecided (``--confidence``: the
    interval straddles the threshold) or within-noise (passed on the point estimate, but the
    interval straddles). ``noise``: the note when the interval straddles."""

    gate: str
    metric: str
    value: float | None
    threshold: float
    status: str
    message: str
    low: float | None = None
    high: float | None = None
    check: str = ""
    rows: int | None = None
    rows_needed: int | None = None
    noise: str | None = None

    @property
    def blocking(self) -> bool:
        return self.status in (FAILED, UNDECIDED)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Decision:
    """The verdicts of one judgement. ``failures`` (exit 1), ``undecided`` (with
    ``--confidence``: the interval straddles the threshold) and ``within_noise`` (notes) are
    views of the verdicts' messages."""

    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [v.message for v in self.verdicts if v.status == FAILED]

    @property
    def undecided(self) -> list[str]:
        return [v.message for v in self.verdicts if v.status == UNDECIDED]

    @property
    def within_noise(self) -> list[str]:
        return [v.noise for v in self.verdicts if v.noise and v.status != UNDECIDED]

    @property
    def status(self) -> str:
        return FAILED if self.failures else UNDECIDED if self.undecided else PASSED

    def reasons(self) -> list[str]:
        return self.failures + self.undecided

    def __add__(self, other: "Decision") -> "Decision":
        return Decision(self.verdicts + other.verdicts)

    def to_dict(self) -> dict:
        return {"status": self.status, "verdicts": [v.to_dict() for v in self.verdicts]}


def _point(spec: GateSpec, figures: dict, limit: float, pre: str, check: str) -> Verdict | None:
    value = figures.get(spec.metric)
    if value is None:
        return None
    bad = spec.outside(value, limit)
    if spec.name == "min_cosine" and not math.isfinite(figures.get("max_abs_diff", 0.0)):
        bad = True  # a non-finite output fails the cosine gate whatever the cosine says
    what = f"{figures.get('metric_name', 'accuracy')} drop" if spec.name == "max_accuracy_drop" else spec.what
    unit = f" {spec.unit}" if spec.unit else ""
    msg = f"{pre}{what} {spec.show(value)}{unit} {spec.op} {limit}" if bad else f"{pre}{what} {spec.show(value)}{unit} meets {limit}"
    return Verdict(spec.name, spec.metric, float(value), limit, FAILED if bad else PASSED, msg, check=check,
                   rows=figures.get("samples"))


def _with_interval(spec: GateSpec, figures: dict, iv: dict, limit: float, confidence: float | None, pre: str,
                   check: str) -> Verdict:
    est, low, high = iv["estimate"], iv["low"], iv["high"]
    what = f"{figures.get('metric_name', 'accuracy')} drop" if spec.name == "max_accuracy_drop" else spec.what
    unit = f" {spec.unit}" if spec.unit else ""
    shown = (f"{what} {spec.show(est)}{unit} [{spec.show(low)}, {spec.show(high)}] ({iv['confidence']:.0%}, "
             f"{iv['rows']} rows, {iv.get('discordant')} discordant)")
    bad_point = spec.outside(est, limit)
    # inside: the whole interval meets the threshold; outside: the whole interval misses it
    inside = low >= limit if spec.direction == "min" else high <= limit
    outside = high < limit if spec.direction == "min" else low > limit
    straddles = not inside and not outside
    need = stats.rows_for_confidence(stats.Interval(**iv), limit) if straddles else None
    base = dict(gate=spec.name, metric=spec.metric, value=float(est), threshold=limit, low=float(low), high=float(high),
                check=check, rows=iv.get("rows"), rows_needed=need)
    more = _more_rows(need, iv.get("rows"), est, limit, spec)
    noise = f"{pre}{shown} straddles {limit}: within noise; {more}" if straddles else None
    if confidence is None:
        if bad_point:
            return Verdict(status=FAILED, message=f"{pre}{shown} {spec.op} {limit}", noise=noise, **base)
        return Verdict(status=WITHIN_NOISE if straddles else PASSED, message=f"{pre}{shown} meets {limit}",
                       noise=noise, **base)
    if outside:
        return Verdict(status=FAILED, message=f"{pre}{shown} entirely {spec.op} {limit}", **base)
    if inside:
        return Verdict(status=PASSED, message=f"{pre}{shown} entirely inside {limit}", **base)
    return Verdict(status=UNDECIDED, message=f"{pre}undecided: {shown} straddles {limit}; {more}", noise=noise, **base)


# rows needed beyond this multiple of the rows judged (the estimate within 1/20 of the interval's
# half-width of the threshold): the estimate is as good as on the threshold
FAR_BEYOND = 400


def _more_rows(need: int | None, rows: int | None, est: float, limit: float, spec: GateSpec) -> str:
    """What would decide a straddling gate: the rows (``stats.rows_for_confidence``), said as
    out of reach when they are more than ``FAR_BEYOND`` times the rows judged (a drop of 1.02
    points [0.44, 1.60] against a 1-point gate on 4,925 rows needed ~7.4 million)."""
    if not need:
        return "the estimate sits on the threshold: more rows cannot decide it"
    if rows and need > FAR_BEYOND * rows:
        return (f"the estimate is {spec.show(abs(est - limit))} from {limit}: as good as on it "
                f"(about {need:,} rows would decide it)")
    return f"about {need:,} rows would decide it"


def judge(figures: dict, gates: Gates, check: str = "", intervals: bool = True) -> Decision:
    """Every gate set in ``gates`` judged on one set of figures (a parity check or task
    metrics). Gates with an interval (``GateSpec.interval``, when the figures carry it) are
    judged with it: without ``gates.confidence`` the point estimate decides and a straddling
    interval is noted as within noise; with it, pass needs the whole interval inside the
    threshold, fail needs it outside, anything else is undecided. A gate whose figure the
    task does not produce is not judged. ``intervals=False``: point estimates only."""
    pre = f"{check}: " if check else ""
    out = []
    for name, limit in gates.thresholds().items():
        spec = GATES[name]
        iv = (figures.get("stats") or {}).get(spec.metric) if spec.interval and intervals else None
        if iv is not None and figures.get(spec.metric) is not None:
            out.append(_with_interval(spec, figures, iv, limit, gates.confidence, pre, check))
        else:
            v = _point(spec, figures, limit, pre, check)
            if v is not None:
                out.append(v)
    return Decision(out)


def judge_checks(checks: dict[str, dict], gates: Gates, intervals: bool = True) -> Decision:
    """Every check (e.g. convert's ``real-lengths`` and ``padded-batch``) judged by ``gates``."""
    d = Decision()
    for name, figures in checks.items():
        d = d + judge(figures, gates, name, intervals)
    return d


# -- what data a gate needs ---------------------------------------------------------------------

def rows_needed(gates: Gates) -> dict[str, int]:
    """Rows each gate set needs (the registry's rows rule), for the gates that have one."""
    out = {}
    for name, limit in gates.thresholds().items():
        need = GATES[name].rows_needed(limit)
        if need:
            out[name] = need
    return out


def check_gates_resolvable(gates: Gates, rows: int, what: str = "the data", hint: str = "") -> None:
    """Refuse, before any work, a gate that ``rows`` cannot resolve (see ``rows_needed``)."""
    for name, need in rows_needed(gates).items():
        if rows < need:
            spec = GATES[name]
            one = spec.show(spec.resolution / max(rows, 1)) + (f" {spec.unit}" if spec.unit else "")
            raise UserError(f"{what} has {rows} rows: one row moves the metric by {one}, too coarse for "
                            f"{spec.flag} {getattr(gates, name)}; it needs >= {need} rows{hint}")


def check_gates_fit(gates: Gates, task: str, labelled: bool) -> None:
    """Refuse, before any work, a gate the task or data cannot answer."""
    for name in gates.thresholds():
        spec = GATES[name]
        if spec.tasks is not None and task not in spec.tasks:
            raise UserError(f"{spec.flag} gates {' or '.join(spec.tasks)} models; this one is {task}")
        if spec.needs_labels and not labelled:
            models = " or ".join(spec.tasks) if spec.tasks else "text-classification or embedding"
            raise UserError(f"{spec.flag} needs labelled data (a label column) for a {models} model")


# -- the target profiles' one rule ----------------------------------------------------------------

@dataclass(frozen=True)
class ProfileRule:
    """A named parity gate a profile's [validation] table refers to (``rule = NAME``):
    ``decisions`` judged on their interval at ``gates.confidence``, plus the ``min_cosine``
    floor."""

    name: str
    gates: Gates

    def describe(self, texts: int | None = None) -> str:
        g = self.gates
        on = f"{texts} built-in texts" if texts else "the built-in texts"
        return (f"rule {self.name}: decisions (the task's: class, tags, answer span, token; embeddings: tie-robust "
                f"top-5 retrieval agreement) agree with PyTorch's on >= {g.min_agreement} of rows, judged on the "
                f"{g.confidence:.0%} interval of each parity check (real lengths, padded batch): FAILED only when the "
                f"whole interval is below {g.min_agreement}, PASSED when it is above; when it straddles, the texts "
                f"cannot decide: the artifact is kept as passed with the verdict 'undecided' and the rows that would "
                f"decide it. Plus a floor of {g.min_cosine} on the lowest per-text cosine of the task's outputs, which "
                f"only a collapsed build misses. Judged on {on}, or on convert's --data when given.")


INT8_RULE = ProfileRule("int8-decisions", Gates(min_agreement=0.95, min_cosine=0.8, confidence=0.95))

PROFILE_RULES: dict[str, ProfileRule] = {r.name: r for r in (INT8_RULE,)}


def profile_status(decision: Decision) -> str:
    """A profile's verdict: failed only on a failed gate; an undecided gate passes (with
    the verdict 'undecided' recorded), since the profile never fails a build its data
    cannot show to be outside the gate (docs/gates.md)."""
    return FAILED if decision.failures else UNDECIDED if decision.undecided else PASSED


# -- CLI flags made from the registry ---------------------------------------------------------------

def gate_field(name: str, help: str = "", fallback: bool = False):
    """The settings-record field of gate ``name`` (or ``confidence``): the registry's flag and
    range, its help, then ``help`` (a command's own sentence), the default a command falls back to
    when no gate is given (``fallback``: as ``optimize`` does) and the range."""
    spec = CONFIDENCE if name == "confidence" else GATES[name]
    default = getattr(spec, "default", None)
    falls = (f"Default when no gate is given and the data is {spec.default_when}: {default}."
             if fallback and default is not None else "")
    return spec.field(None, help=" ".join(p for p in (help, falls, f"Range {spec.range_text()}.") if p))


def flag_specs() -> dict[str, Setting]:
    """Every registry flag by its name on the command line."""
    return {s.flag: s for s in (*GATES.values(), CONFIDENCE)}



def registry_markdown() -> str:
    """The registry as a Markdown table (docs/gates.md holds it; a test keeps them equal)."""
    lines = ["| gate | flag | figure | passes when | unit | range | optimize's default | rows needed | labels |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in GATES.values():
        rows = f"2 × {s.resolution:g} / \\|{s.perfect:g} − threshold\\|" if s.resolution else "-"
        default = f"{s.default} ({s.default_when} data)" if s.default is not None else "-"
        lines.append(f"| `{s.name}` | `{s.flag}` | `{s.metric}`{' (interval)' if s.interval else ''} | "
                     f"{'>=' if s.direction == 'min' else '<='} threshold | {s.unit or '-'} | {s.range_text()} | {default} | "
                     f"{rows} | {'yes' if s.needs_labels else 'no'} |")
    c = CONFIDENCE
    lines.append(f"| `{c.name}` (a setting) | `{c.flag}` | - | - | - | {c.range_text()} | - | - | - |")
    return "\n".join(lines)
