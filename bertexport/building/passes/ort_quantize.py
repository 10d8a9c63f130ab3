"""ONNX Runtime int8 quantization.

Dynamic quantization (weights int8 offline, activations quantized per call) needs no
calibration data. What breaks BERT-family accuracy, and what this pass does about it:
- the weight range. On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) ORT multiplies u8
  activations by s8 weights with VPMADDUBSW, whose 16-bit pair sums can saturate; ORT's
  documented remedies are ``reduce_range`` (7-bit weights) or U8U8 kernels. Measured on an
  AVX2-only AMD Zen 3 (ORT 1.32, all-MiniLM-L6-v2, built-in calibration text, min cosine to
  fp32): saturation cost nothing measurable — the same s8 model run through ORT's exact U8U8
  rewrite (session option ``session.x64quantprecision``) scored 0.947 vs 0.949 per channel,
  0.738 vs 0.738 per tensor — while ``reduce_range`` cost a lot (per tensor 0.74 -> 0.55,
  per channel 0.949 -> 0.937; 0.60 on a Zen 5 earlier). So every preset quantizes
  full-range s8 weights (U8S8, ORT's fast kernels); ``reduce_range`` stays an explicit option.
- per-tensor weights lose more than per-channel (ORT#11286, ORT#5644; MiniLM here: min
  cosine 0.74 vs 0.95); which is faster depends on the CPU, so ``optimize`` measures both.
- some MatMuls of a trained model are far more sensitive than others (FFN in/out, value
  projections). Two fallbacks keep a few in float instead of shipping a collapsed model
  (ORT#9599, pytorch#27949): ``target_agreement`` decides on what the outputs are for —
  the task's decisions (class, tags, answer start/end, token) or, for embeddings, tie-robust
  top-5 retrieval agreement, both from ``bertexport.judging.compare`` — with at most ``max_float``
  nodes kept float, found by a group search (``search_float_nodes``: each of the family's
  regions restored to float as a group, the best groups bisected down to one node each,
  added while they buy decisions; 15 tries on MiniLM instead of one per weight node, see
  docs/first-command.md). Each try is the all-int8 graph with nodes edited back to float
  (``with_float_nodes``: no new quantization of every weight); ``target_min_cosine`` (the
  older proxy) restores until the calibration cosine meets a target.
- named regions (``keep_float``) map onto fused graphs too: a fused Attention node is its
  layer's ``attention_qkv`` (``bertexport.building.graph.region_nodes``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable


from bertexport.core.families import check_region_spec, get_family
from bertexport.building.graph import node_regions, region_nodes, sensitive_nodes, weight_nodes
from bertexport.core.options import option
from bertexport.core.progress import quiet
from bertexport.building.passes.base import Capability, ModelFile, Pass, PassContext



# ISA presets for dynamic int8 -> reduce_range. ORT's own presets (and optimum's) use 7-bit
# weights on AVX2/AVX-512 without VNNI against VPMADDUBSW saturation; measured here that
# costs far more accuracy than the saturation it avoids (see the module doc), so no preset
# reduces the range. The isa stays recorded so a CPU where that differs gets its own entry.
_ISA_REDUCE_RANGE = {"avx512_vnni": False, "arm64": False, "avx2": False, "avx512": False}


@dataclass
class DynamicQuantizeConfig:
    isa: str = option("avx512_vnni", "ORT's int8 preset for the CPU family (sets reduce_range)", choices=tuple(_ISA_REDUCE_RANGE))
    per_channel: bool = option(True, "per-channel weight scales (per-tensor loses more: ORT#11286, #5644)")
    reduce_range: bool | None = option(None, "7-bit weights (none: from isa)")
    weight_type: str = option("qint8", "int8 weight type", choices=("qint8", "quint8"))
    op_types: list[str] = option(help="op types to quantize (Attention: the fused attention's Q/K/V weights; Gather too "
                                      "would quantize embeddings)", default_factory=lambda: ["MatMul"])
    exclude_nodes: list[str] = option(help="node names left fp32", default_factory=list)
    keep_float: list[str] = option(help="named regions left fp32: attention_qkv, attention_output, ffn_input, ffn_output, head "
                                        "(optionally @LAYER)", default_factory=list)
    target_agreement: float | None = option(
        None, "decision fallback: restore to float the weight nodes that bring back most decisions (class, tags, answer "
              "start/end, token; tie-robust top-5 retrieval for embeddings) until agreement with fp32 on the calibration "
              "sentences reaches this", min=0, max=1)
    max_float: int = option(4, "most weight nodes the decision fallback keeps float", min=0)
    target_min_cosine: float | None = option(None, "cosine fallback: keep the worst MatMuls fp32 until calibration cosine meets this",
                                             min=0, max=1, min_open=True)
    max_excluded_fraction: float = option(0.35, "most MatMuls the cosine fallback may keep fp32 (fraction)", min=0, max=1)
    sensitivity_samples: int = option(48, "calibration sentences the fallback scores on", min=1)

    def validate(self):
        for spec in self.keep_float:
            check_region_spec(spec)
        if self.target_agreement is not None and self.target_min_cosine is not None:
            raise ValueError("target_agreement and target_min_cosine are two fallbacks: set one")

    @property
    def effective_reduce_range(self) -> bool:
        return _ISA_REDUCE_RANGE[self.isa] if self.reduce_range is None else self.reduce_range


def _scan_cache_file(model_path, texts: list[str], config: DynamicQuantizeConfig):
    """Where the fallback's answer for this input graph, on these texts, with these settings is kept."""
    import onnxruntime

    from bertexport.core.cache import cache_dir
    from bertexport.core.hashing import cache_key, sha256_file

    key = cache_key(sha256_file(model_path), texts, asdict(config), onnxruntime.__version__, _SEARCH_VERSION)
    return cache_dir("sensitivity") / f"{key}.json"


class _Scorer:
    """Min cosine of a candidate ONNX model against the fp32 input model on calibration feeds."""

    def __init__(self, fp32_path, ctx: PassContext, samples: int):
        from bertexport.backends.onnxruntime.runner import OrtRunner
        from bertexport.judging.compare import min_cosine

        self._runner_cls, self._min_cosine = OrtRunner, min_cosine
        texts = ctx.calibration_texts()[:samples]
        # dynamic int8 scales activations per tensor over the whole batch, so a padded
        # batch (as a server sends) is harder than one sentence: score both
        self.batches = [ctx.encode(texts[i:i + 16], padding="max_length", length=64) for i in range(0, len(texts), 16)]
        self.batches += [ctx.encode([t], padding="longest") for t in texts[:8]]
        self.task, self.threads = ctx.task, ctx.threads
        self.reference = self._run(fp32_path)

    def _run(self, path):
        with self._runner_cls(path, threads=self.threads) as r:
            return [r.infer(b) for b in self.batches]

    def __call__(self, path) -> float:
        outs = self._run(path)
        return min(self._min_cosine(ref, out, self.task, b["attention_mask"])
                   for ref, out, b in zip(self.reference, outs, self.batches))


class _DecisionScorer:
    """How many of the fp32 input model's decisions a candidate keeps on the calibration
    sentences: the task's decisions, or tie-robust top-5 retrieval agreement for embeddings
    (``compare.task_metrics``). Scored on padded batches (as a server sends them: dynamic
    int8 scales activations over the whole batch) and on each sentence alone; the lower counts."""

    def __init__(self, fp32_path, ctx: PassContext, samples: int):
        from bertexport.backends.onnxruntime.runner import OrtRunner
        from bertexport.core.tasks import get_task

        self._runner_cls = OrtRunner
        texts = ctx.calibration_texts()[:samples]
        self.sentences = len(texts)
        self.measure = "decisions" if get_task(ctx.task).decisions is not None else "retrieval agreement (tie-robust top-5)"
        self.views = {"padded": [ctx.encode(texts[i:i + 16], padding="max_length", length=64) for i in range(0, len(texts), 16)],
                      "alone": [ctx.encode([t], padding="longest") for t in texts]}
        self.task, self.threads = ctx.task, ctx.threads
        self.reference = self._run(fp32_path)

    def _run(self, path) -> dict:
        with self._runner_cls(path, threads=self.threads) as r:
            return {v: [r.infer(b) for b in feeds] for v, feeds in self.views.items()}

    def __call__(self, path) -> dict:
        from bertexport.judging.compare import Comparison, task_metrics

        outs = self._run(path)
        worst = None
        for view, feeds in self.views.items():
            comp = Comparison(self.task)
            for f, ref, out in zip(feeds, self.reference[view], outs[view]):
                comp.add(ref, out, f["attention_mask"])
            m = task_metrics(comp, None)
            iv = (m.get("stats") or {}).get("agreement") or {}
            figures = {"agreement": float(m.get("agreement", 1.0)), "cosine_mean": float(m["cosine_mean"]),
                       "discordant": iv.get("discordant"), "rows": iv.get("rows"), "view": view}
            if worst is None or (figures["agreement"], figures["cosine_mean"]) < (worst["agreement"], worst["cosine_mean"]):
                worst = figures
        return worst


def _private_copy(src):
    """The model to quantize, in memory. Given a path, ORT's quantizer writes
    ``<model>-inferred.onnx`` beside it and deletes it again; beside a cached export, two
    builds at once (two CI jobs, optimize and convert) then delete each other's file
    ("Failed to find proper ai.onnx domain", FileNotFoundError). Given a ModelProto it works
    in a private temporary folder."""
    import onnx

    return onnx.load(str(src))


def with_float_nodes(int8, fp32, names: list[str]):
    """``int8`` (a ModelProto quantize_dynamic made from ``fp32``) with the weight nodes
    ``names`` back in float, by editing the graph instead of quantizing every weight again
    (most of the time of a fresh ``quantize_dynamic`` run): each node's int8 chain (its
    output's producer and the nodes behind it up to the float node's own inputs, e.g.
    DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul) is replaced by the float node,
    where the chain ended; chain nodes and weights nothing else uses are dropped (an
    activation's DynamicQuantizeLinear shared with other int8 nodes stays). The result runs
    the same kernels as ``quantize_dynamic`` with ``names`` excluded."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(int8)
    g = model.graph
    originals = {n.name: n for n in fp32.graph.node}
    float_weights = {i.name: i for i in fp32.graph.initializer}
    # nodes by position; bookkeeping by position and by counts of uses, so a group of nodes
    # costs one pass over the graph, not one deep protobuf comparison per node and name
    nodes = list(g.node)
    live = [True] * len(nodes)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    uses: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in g.output:
        uses[o.name] = uses.get(o.name, 0) + 1
    dropped: set[str] = set()  # inputs of nodes taken out

    def take_out(at: int) -> None:
        for i in nodes[at].input:
            uses[i] -= 1
            dropped.add(i)

    for name in names:
        node = originals[name]
        chain, todo, stops = [], [node.output[0]], set(node.input)
        while todo:
            t = todo.pop()
            if t in stops or t not in producer or producer[t] in chain:
                continue
            chain.append(producer[t])
            todo.extend(nodes[producer[t]].input)
        if not chain or nodes[chain[0]].op_type == node.op_type and list(nodes[chain[0]].input) == list(node.input):
            raise ValueError(f"{name} is not int8 in this model")
        at = chain[0]
        take_out(at)
        nodes[at] = node
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
        changed = True
        while changed:  # drop chain nodes whose outputs nothing uses any more
            changed = False
            for i in chain[1:]:
                if live[i] and not any(uses.get(o, 0) for o in nodes[i].output):
                    live[i], changed = False, True
                    take_out(i)
                    for o in nodes[i].output:
                        producer.pop(o, None)
    kept = [n for n, alive in zip(nodes, live) if alive]
    del g.node[:]
    g.node.extend(kept)
    have = {i.name for i in g.initializer}
    wanted = {i for name in names for i in originals[name].input}
    g.initializer.extend(float_weights[i] for i in dict.fromkeys(i for name in names for i in originals[name].input)
                         if i in float_weights and i not in have)  # the float weights, once each
    gone = {i for i in dropped if not uses.get(i, 0)} - wanted
    remaining = [i for i in g.initializer if i.name not in gone]
    del g.initializer[:]
    g.initializer.extend(remaining)
    return model


# The decision fallback's search; part of the scan cache's key, so a changed search never
# reuses an answer the old one found.
_SEARCH_VERSION = "region-groups-bisect-1"


def _figure_key(figures: dict) -> tuple[float, float]:
    return figures["agreement"], figures["cosine_mean"]


@dataclass
class FloatSearch:
    """What ``search_float_nodes`` found: ``kept`` (the weight nodes to keep float, empty
    when no restore bought decisions), their ``figures``, and the search's trace."""

    kept: list[str]
    figures: dict
    tries: int
    groups: dict[str, dict] = field(default_factory=dict)  # group name -> its figures, restored as a whole
    champions: list[str] = field(default_factory=list)  # each bisected group's best node, in the order tried


def search_float_nodes(groups: dict[str, list[str]], score: Callable[[list[str]], dict], baseline: dict, *,
                       max_float: int, target: float, log: Callable[[str], None] = lambda _: None) -> FloatSearch:
    """Which weight nodes (at most ``max_float``) to put back in float so that the most
    decisions return, without trying every node alone.

    ``score(nodes)`` runs the all-int8 model with ``nodes`` float and returns figures with
    ``agreement`` (decisions kept) and ``cosine_mean``; ``baseline`` is all-int8's. Groups
    (the family's regions: every layer's FFN input, FFN output, ...) are each restored as a
    whole and ranked; in rank order, a group whose float as a whole buys decisions over
    all-int8 is bisected — its halves (in layer order) restored, the better half kept — down to
    its best node, and that node is added to the ones kept while the addition buys
    decisions (agreement strictly up; a tie in agreement is no reason for one more float
    node), until ``target`` or ``max_float``. Every set the
    search scored is a candidate: the answer is the scored set of at most ``max_float``
    nodes with the most decisions, then the fewest nodes, then the highest cosine, and only
    if it beats all-int8. Decisions on a few dozen sentences move by single rows, so a
    node's own error does not predict them (each MatMul's own int8 error ranked last the
    node a try-every-node scan kept on MiniLM): every comparison here is on decisions."""
    seen: dict[frozenset, tuple[list[str], dict]] = {}

    def tried(nodes: list[str]) -> dict:
        key = frozenset(nodes)
        if key not in seen:
            seen[key] = (list(nodes), score(list(nodes)))
        return seen[key][1]

    groups = {name: list(nodes) for name, nodes in groups.items() if nodes}
    if max_float < 1 or not groups:
        return FloatSearch([], baseline, 0)
    group_figures = {name: tried(nodes) for name, nodes in groups.items()}
    ranked = sorted(groups, key=lambda name: _figure_key(group_figures[name]), reverse=True)
    log("groups restored to float: " + ", ".join(f"{name} ({len(groups[name])}) {group_figures[name]['agreement']:.4f}"
                                                  for name in ranked))

    def best_node(nodes: list[str]) -> str:
        while len(nodes) > 1:
            half = (len(nodes) + 1) // 2
            first, second = nodes[:half], nodes[half:]
            nodes = first if _figure_key(tried(first)) >= _figure_key(tried(second)) else second
        return nodes[0]

    chosen, figures, champions = [], baseline, []
    for name in ranked:
        if len(chosen) >= max_float or figures["agreement"] >= target:
            break
        if group_figures[name]["agreement"] <= baseline["agreement"]:
            break  # not even the whole group float buys a decision: one of its nodes will not either, likely
        champion = best_node(groups[name])
        champions.append(champion)
        got = tried(chosen + [champion])
        log(f"{len(chosen) + 1} weight node(s) float (+ the best of {name}): agreement {got['agreement']:.4f}")
        if got["agreement"] <= figures["agreement"]:
            break
        chosen, figures = chosen + [champion], got
    candidates = [(nodes, fig) for nodes, fig in seen.values()
                  if 0 < len(nodes) <= max_float and fig["agreement"] > baseline["agreement"]]
    if not candidates:
        return FloatSearch([], baseline, len(seen), group_figures, champions)
    kept, figures = max(candidates, key=lambda c: (c[1]["agreement"], -len(c[0]), c[1]["cosine_mean"]))
    return FloatSearch(kept, figures, len(seen), group_figures, champions)


def search_groups(model_path, candidates: list[str], regions: dict[str, str]) -> dict[str, list[str]]:
    """The groups ``search_float_nodes`` restores: the candidates by the family's region
    (every layer's ``ffn_input``, ...; in graph order, so halves are layer ranges), the rest
    as ``other``. Without regions (or when they name fewer than two groups), runs of about
    sqrt(n) consecutive nodes."""
    import math

    where = node_regions(model_path, regions) if regions else {}
    groups: dict[str, list[str]] = {}
    for node in candidates:
        groups.setdefault(where[node][0] if node in where else "other", []).append(node)
    if len(groups) < 2 and len(candidates) > 1:
        size = max(1, math.ceil(math.sqrt(len(candidates))))
        groups = {f"nodes {i + 1}-{min(i + size, len(candidates))}": candidates[i:i + size]
                  for i in range(0, len(candidates), size)}
    return groups


class OrtDynamicQuantize(Pass):
    """Dynamic int8 (weights offline, activations per call), optional float fallback decided
    on the task's decisions (or on calibration cosine)."""

    name = "ort-dynamic-quantize"
    Config = DynamicQuantizeConfig
    capability = Capability("onnxruntime", "int8", fast_with=("avx512_vnni", "avx_vnni", "amx_int8", "asimddp"))

    def _quantize(self, src, dst, config: DynamicQuantizeConfig, exclude, only=None):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with quiet("root"):  # ORT's quantizer logs an advisory on every call
            self._quantize_impl(quantize_dynamic, QuantType, src, dst, config, exclude, only)

    def _quantize_impl(self, quantize_dynamic, QuantType, src, dst, config, exclude, only):
        kwargs = {}
        if only is not None:
            kwargs["nodes_to_quantize"] = only
        quantize_dynamic(
            _private_copy(src),
            str(dst),
            per_channel=config.per_channel,
            reduce_range=config.effective_reduce_range,
            weight_type=QuantType.QInt8 if config.weight_type == "qint8" else QuantType.QUInt8,
            op_types_to_quantize=config.op_types,
            nodes_to_exclude=list(exclude),
            # ORT-optimized graphs lose value_info for fused weights; without a default the
            # quantizer fails with "Unable to find data type for weight_name".
            extra_options={"DefaultTensorType": 1},
            **kwargs,
        )

    def run(self, model: ModelFile, config: DynamicQuantizeConfig, ctx: PassContext) -> ModelFile:
        out = ctx.workdir / "model.int8.onnx"
        regions = get_family(ctx.family).regions if ctx.family else {}
        exclude = list(config.exclude_nodes) + region_nodes(model.path, config.keep_float, regions)
        notes: dict = {"excluded_nodes": exclude, "reduce_range": config.effective_reduce_range}
        fallback = "decisions" if config.target_agreement is not None else "cosine" if config.target_min_cosine is not None else None
        if fallback is None:
            self._quantize(model.path, out, config, exclude)
            return ModelFile(out, "onnx", notes=notes | {"float_weight_nodes": len(exclude)})
        cache = _scan_cache_file(model.path, ctx.calibration_texts()[: config.sensitivity_samples], config)
        if cache.is_file():  # same graph, texts and settings: the fallback's answer is known
            notes = json.loads(cache.read_text())
            self._quantize(model.path, out, config, notes["excluded_nodes"])
            ctx.log(f"float fallback reused from the cache: {len(notes['excluded_nodes'])} weight node(s) kept float")
            return ModelFile(out, "onnx", notes=notes | {"scan": "cached"})
        self._quantize(model.path, out, config, exclude)
        if fallback == "decisions":
            exclude, notes = self._decision_fallback(model, out, config, ctx, exclude)
        else:
            exclude, notes = self._sensitivity_exclusion(model, out, config, ctx, exclude)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps(notes))
        os.replace(tmp, cache)
        return ModelFile(out, "onnx", notes=notes | {"scan": "ran"})

    @staticmethod
    def _float_restorer(fp32_path, int8_path, dst):
        """restore(nodes) writes to ``dst`` the all-int8 model with ``nodes`` back in float
        (``with_float_nodes``: a graph edit, no new quantization of every weight)."""
        import onnx

        fp32, int8 = onnx.load(str(fp32_path)), onnx.load(str(int8_path))

        def restore(nodes: list[str]) -> None:
            onnx.save(with_float_nodes(int8, fp32, nodes), str(dst))

        return restore

    def _decision_fallback(self, model, out, config: DynamicQuantizeConfig, ctx: PassContext, exclude):
        """Keep float only what the task's decisions need: nothing when all-int8 keeps them;
        else at most ``max_float`` weight nodes found by ``search_float_nodes`` (regions
        restored as groups, the best bisected to a node, added while they buy decisions)."""
        score = _DecisionScorer(model.path, ctx, config.sensitivity_samples)
        target = config.target_agreement
        before = score(out)
        what = f"{score.measure} on {score.sentences} calibration sentences"
        notes = {"fallback": "decisions", "measure": score.measure, "sentences": score.sentences, "target_agreement": target,
                 "max_float": config.max_float, "reduce_range": config.effective_reduce_range, "all_int8": before}
        if before["agreement"] >= target:
            ctx.log(f"all-int8 keeps {what}: {before['agreement']:.4f} >= {target}; nothing kept float")
            return exclude, notes | {"excluded_nodes": exclude, "kept_float": 0, "float_weight_nodes": len(exclude), "after": before,
                                     "why": f"all-int8 kept {what} at {before['agreement']:.4f} (target {target}): "
                                            f"no weight node kept float"}
        candidates = [n for n in weight_nodes(model.path, config.op_types) if n not in exclude]
        limit = min(config.max_float, len(candidates))
        groups = search_groups(model.path, candidates, get_family(ctx.family).regions if ctx.family else {})
        ctx.log(f"all-int8 {score.measure} {before['agreement']:.4f} < {target}: searching {len(candidates)} weight nodes "
                f"in {len(groups)} groups (each group restored to float, the best bisected), keeping at most {limit} float")
        probe = ctx.workdir / "probe.onnx"
        restore = self._float_restorer(model.path, out, probe)

        def score_float(nodes: list[str]) -> dict:
            restore(nodes)
            return score(probe)

        found = search_float_nodes(groups, score_float, before, max_float=limit, target=target, log=ctx.log)
        probe.unlink(missing_ok=True)
        best, kept = found.figures, found.kept
        if kept:  # the artifact is quantize_dynamic's own build with those nodes excluded
            self._quantize(model.path, out, config, exclude + kept)
        how = f"{found.tries} tries: regions restored as groups, the best bisected to a node"
        if kept:
            why = (f"all-int8 (faster, no weight node float) was rejected: it kept {what} at {before['agreement']:.4f} < "
                   f"target {target} ({before['discordant']} discordant); {len(kept)} weight node(s) restored to float "
                   f"(those that bring back most decisions, {how}) give {best['agreement']:.4f}")
        else:
            why = (f"all-int8 kept {what} at {before['agreement']:.4f} < target {target}, and no restore of up to {limit} "
                   f"weight node(s) to float the search tried ({how}) did better: kept all-int8 (the parity gate decides)")
        if kept and best["agreement"] < target:
            why += f"; the target was not reached within max_float={config.max_float}"
        ctx.log(why)
        final = exclude + kept
        return final, notes | {"excluded_nodes": final, "kept_float": len(kept), "float_weight_nodes": len(final),
                               "after": best, "why": why,
                               "search": {"method": _SEARCH_VERSION, "tries": found.tries, "candidates": len(candidates),
                                          "groups": {g: f["agreement"] for g, f in found.groups.items()},
                                          "champions": found.champions}}

    def _sensitivity_exclusion(self, model, out, config, ctx: PassContext, exclude):
        score = _Scorer(model.path, ctx, config.sensitivity_samples)
        achieved = score(out)
        notes = {"reduce_range": config.effective_reduce_range, "target_min_cosine": config.target_min_cosine,
                 "all_int8_min_cosine": achieved}
        if achieved >= config.target_min_cosine:
            ctx.log(f"int8 min cosine {achieved:.4f} meets target {config.target_min_cosine}: no fp32 fallback")
            return exclude, notes | {"excluded_nodes": exclude, "achieved_min_cosine": achieved}
        candidates = [n for n in weight_nodes(model.path, config.op_types) if n not in exclude]
        ctx.log(f"int8 min cosine {achieved:.4f} < target {config.target_min_cosine}: scanning {len(candidates)} nodes")
        probe = ctx.workdir / "probe.onnx"
        sensitivity = {}
        for node in candidates:  # each node quantized alone: how much does it cost?
            self._quantize(model.path, probe, config, [], only=[node])
            sensitivity[node] = score(probe)
        ranked = sorted(candidates, key=lambda n: sensitivity[n])
        limit = max(1, int(len(candidates) * config.max_excluded_fraction))
        best = (achieved, [])
        k = 1
        while k <= limit:
            trial = exclude + ranked[:k]
            self._quantize(model.path, probe, config, trial)
            c = score(probe)
            ctx.log(f"fp32 fallback for {k} most sensitive node(s): min cosine {c:.4f}")
            if c > best[0]:
                best = (c, ranked[:k])
                probe.replace(out)
            if c >= config.target_min_cosine:
                break
            k = k + 1 if k < 4 else int(k * 1.5)
        if best[0] < config.target_min_cosine:
            ctx.log(f"the scan's target {config.target_min_cosine} (how hard the fp32 fallback tries) was not reached with "
                    f"up to {limit} fp32 MatMuls; best {best[0]:.4f} with {len(best[1])} kept fp32. "
                    "The profile's parity gate (checked next) decides whether the build passes.")
        probe.unlink(missing_ok=True)
        final = exclude + best[1]
        return final, notes | {
            "excluded_nodes": final,
            "kept_fp32": len(best[1]),
            "why": (f"{len(best[1])} of {len(candidates)} weight MatMuls kept fp32: the most sensitive ones, restored one "
                    f"by one until the calibration min cosine reached the scan target {config.target_min_cosine} "
                    f"(achieved {best[0]:.4f}); the artifact's gate is the profile's [validation] tolerance"),
            "achieved_min_cosine": best[0],
            "sensitivity": {n: round(sensitivity[n], 6) for n in ranked[: max(len(best[1]), 8)]},
        }




# -- static (QDQ) quantization --------------------------------------------------------

_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


@dataclass
class StaticQuantizeConfig:
    calibration_method: str = option("minmax", "activation range calibration", choices=tuple(_CALIBRATION))
    calibration_samples: int = option(200, "calibration sentences (\"around 200 examples is enough\": optimum docs)", min=1)
    percentile: float = option(99.999, "percentile calibration's cut", min=0, max=100, min_open=True)
    per_channel: bool = option(True, "per-channel weight scales")
    activation_type: str = option("quint8", "int8 activation type", choices=("qint8", "quint8"))
    weight_type: str = option("qint8", "int8 weight type", choices=("qint8", "quint8"))
    symmetric_activations: bool = option(False, "symmetric activation ranges")
    op_types: list[str] = option(help="op types to quantize", default_factory=lambda: ["MatMul"])
    exclude_sensitive: bool = option(True, "keep LayerNorm, GELU, Softmax + mask Add, embedding and residual Adds float (optimum#151)")
    exclude_nodes: list[str] = option(help="node names left float", default_factory=list)
    keep_float: list[str] = option(help="named regions left float (families.REGIONS, optionally @LAYER)", default_factory=list)
    # TensorRT's explicit quantization wants symmetric int8, a Q/DQ pair on weights and one
    # pair per consumer (optimum PR#407/#812, onnxruntime-inference-examples#56)
    for_tensorrt: bool = option(False, "TensorRT's explicit quantization: symmetric, Q/DQ on weights, dedicated pairs")

    def validate(self):
        for spec in self.keep_float:
            check_region_spec(spec)


class _TextReader:
    """ORT CalibrationDataReader over tokenized sentences, one per batch: batch > 1 breaks
    histogram calibrators (optimum#409) and multiplies memory (ORT#10503)."""

    def __init__(self, items):
        self._it = iter(items)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - part of the reader protocol
        pass


class OrtStaticQuantize(Pass):
    """Static int8 in QDQ format, calibrated on text: the format TensorRT and ORT's
    int8 kernels consume."""

    name = "ort-static-quantize"
    Config = StaticQuantizeConfig
    capability = Capability("onnxruntime", "int8", needs_calibration=True, fast_with=("avx512_vnni", "avx_vnni", "amx_int8"))

    def run(self, model: ModelFile, config: StaticQuantizeConfig, ctx: PassContext) -> ModelFile:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        texts = ctx.calibration_texts()[: config.calibration_samples]
        if config.calibration_method == "minmax":
            items = [ctx.encode([t], padding="longest") for t in texts]
        else:  # histogram calibrators stack all items: they need one shape
            longest = max(ctx.encode([t])["input_ids"].shape[1] for t in texts)
            items = [ctx.encode([t], padding="max_length", length=longest) for t in texts]
        exclude = list(config.exclude_nodes)
        if config.exclude_sensitive:
            exclude += sensitive_nodes(model.path)
        exclude += region_nodes(model.path, config.keep_float, get_family(ctx.family).regions if ctx.family else {})
        exclude = sorted(set(exclude))
        qt = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
        extra = {"ActivationSymmetric": config.symmetric_activations, "WeightSymmetric": True}
        act_type = config.activation_type
        if config.for_tensorrt:
            extra |= {"ActivationSymmetric": True, "AddQDQPairToWeight": True, "DedicatedQDQPair": True,
                      "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}
            act_type = "qint8"
        if config.calibration_method == "percentile":
            extra["CalibPercentile"] = config.percentile
        out = ctx.workdir / "model.qdq.onnx"
        ctx.log(f"calibrating ({config.calibration_method}) on {len(items)} sentences; {len(exclude)} nodes kept float")
        with quiet("root"):  # ORT's quantizer logs an advisory on every call
            quantize_static(
                _private_copy(model.path), str(out), _TextReader(items),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=config.op_types,
                per_channel=config.per_channel,
                activation_type=qt[act_type],
                weight_type=qt[config.weight_type],
                nodes_to_exclude=exclude,
                calibrate_method=getattr(CalibrationMethod, _CALIBRATION[config.calibration_method]),
                extra_options=extra,
            )
        return ModelFile(out, "onnx", notes={"calibration_items": len(items), "excluded_nodes": len(exclude)})
