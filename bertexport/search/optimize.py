"""``optimize``: the fastest artifact that keeps the user's task accuracy, found by search.

What it does, in order:

1. Checks everything first (checkpoint, data, gates, destination), then splits the data
   into a *search* slice and a held-out *confirm* slice. The PyTorch original runs once
   per slice; every candidate is scored against those outputs by the one comparison
   engine (``bertexport.judging.compare``) with the user's gate: accuracy drop in points on
   labelled classification data, agreement (equal decisions; top-5 retrieval agreement
   for embeddings) and/or cosine otherwise.
2. Offers only candidates this machine runs natively (``candidate_recipes``): the
   backends installed, int8 recipes, and float regions in bf16 only where the CPU has
   AVX-512 BF16 / AMX. The first is the best anchor recipe (OpenVINO + NNCF int8 with
   OpenVINO's default precision for this CPU).
3. Tries them fastest-first. An int8 candidate that misses the gate is repaired region
   by region: regions (per layer: attention projections, attention output, FFN in, FFN
   out — named by the family's record) are ranked by how much quantizing each *alone*
   moves the task outputs on the search slice (ONNX Runtime dynamic int8, seconds per
   region), and the most harmful are restored to float (bf16 where native) 1, 2, 4, ...
   at a time until the gate holds. A candidate whose quick latency cannot beat the best
   passing one is pruned before its accuracy is measured, and restoring more regions only
   makes a build slower, so a pruned restore stops its ladder.
4. Optionally tries the original shrunk by post-training pruning to a few MAC budgets
   (``prune``; ``bertexport.search.pruned``: no training, minutes; fastest int8 recipes)
   and searches students (``distill``; ``bertexport.search.students``): shapes ordered
   by a latency cost model measured on this machine, hopeless ones never trained, the rest
   trained within the budget and judged against the *original* model. With ``early_exit``
   (text classification; ``bertexport.search.early_exit_candidate``) it also tries an
   early-exit artifact: heads and threshold from the search slice, its latency the slice's
   mean row cost on the latency cell, judged by the gate like any candidate.
5. Times the passing candidates, the anchor and PyTorch interleaved, confirms the fastest
   on the held-out slice, and publishes it as a normal artifact whose manifest carries a
   ``search`` section, with ``search.json``, ``search.md`` and ``search.png`` inside.
   No candidate passing: the best-scoring one is kept as ``OUT.rejected`` (exit 1).

Every build is cached by (checkpoint, recipe, calibration, bertexport version) and every
evaluation by (build, data slice), so a rerun after an interruption costs little; each
candidate is plain data (``Candidate.to_dict``), so candidates could run elsewhere. A search
that finished is replayed when run again with the same inputs, settings and budget on the
same machine and versions (``bertexport.search.replay``): its result in seconds, said so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from bertexport.search.candidates import candidate_recipes, check_backends  # noqa: F401  (candidate_recipes re-exported)
from bertexport.judging.compare import compare_on_data, task_labels
from bertexport.judging.gates import Gates, check_gates_fit, check_gates_resolvable, default_gates, rows_needed
from bertexport.core.errors import GateFailed, UserError
from bertexport.core.hashing import cache_key
from bertexport.core.progress import Reporter
from bertexport.search.report import build_report, plot, to_markdown  # noqa: F401  (re-exported)
from bertexport.search.settings import OptimizeSettings
from bertexport.search.replay import load_memo, memo_key, save_memo
from bertexport.search.session import Search, SearchResult, Trial, parse_budget, split_slices  # noqa: F401  (parse_budget re-exported)
from bertexport.search.pruned import plan_pruning, pruned_search
from bertexport.search.early_exit_candidate import exit_mix, plan_exit_search, search_early_exit
from bertexport.search.student_shapes import plan_init_students, plan_students
from bertexport.search.students import search_students
from bertexport.students.device import training_device


def region_ranking(search: Search, model_path: str, torch_model, samples: int = 64) -> list[dict]:
    """Regions (``region@layer``) ranked by how much quantizing each alone (ORT dynamic
    int8) moves the task outputs on the search slice: 1 - mean cosine to the original."""
    from bertexport.backends.onnxruntime.runner import OrtRunner
    from bertexport.building.checkpoint import resolve_checkpoint
    from bertexport.building.export import export_onnx
    from bertexport.core.families import get_family
    from bertexport.building.graph import regions_in, weight_nodes
    from bertexport.building.passes.ort_quantize import DynamicQuantizeConfig, OrtDynamicQuantize
    from bertexport.core.staging import WorkFolder
    from bertexport.core.textdata import TextSet

    ckpt = resolve_checkpoint(model_path, search.task, trust_remote_code=search.trust_remote_code)
    exported = export_onnx(ckpt, torch_model, 18)
    fam = get_family(ckpt.family)
    groups = regions_in(weight_nodes(exported.path, ["MatMul"]), fam.regions)
    groups = {k: v for k, v in groups.items() if k[0] != "head"}
    data = TextSet(search.search.data.texts[:samples], None, search.search.data.pairs[:samples] if search.search.data.pairs else None)
    cache: dict = {}
    rows = []
    quant = OrtDynamicQuantize()
    cfg = DynamicQuantizeConfig()
    with WorkFolder("ranking") as work:
        for (region, layer), nodes in sorted(groups.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
            if search.remaining() <= 0:  # the budget holds here too: unmeasured regions rank last
                spec = region if layer is None else f"{region}@{layer}"
                rows.append({"region": spec, "nodes": len(nodes), "harm": None, "cosine_min": None})
                continue
            probe = work / "probe.onnx"
            quant._quantize(exported.path, probe, cfg, [], only=nodes)
            with OrtRunner(probe, threads=search.threads) as r:
                comp = compare_on_data(r, search.reference, search.encode, data, search.task, reference_cache=cache)
            s = comp.summary()
            spec = region if layer is None else f"{region}@{layer}"
            rows.append({"region": spec, "nodes": len(nodes), "harm": 1.0 - s["cosine_mean"], "cosine_min": s["cosine_min"]})
    rows.sort(key=lambda r: -1.0 if r["harm"] is None else -r["harm"])
    rows.sort(key=lambda r: r["harm"] is None)  # measured first
    return rows


def optimize(model: str, data: str | Path | None, out: str | Path, *, task: str | None = None, gates: Gates | None = None,
             budget: str | float = "20m", distill: str | list[int] | None = None, distill_epochs: int | None = None,
             prune: str | list[float] | None = None, early_exit: str | None = None,
             distill_data: str | Path | None = None,
             threads: int | None = None, batch: int = 1, sequence: int = 128, calib: str | Path | None = None,
             search_fraction: float = 0.5, max_search_rows: int = 600, seed: int = 0, text_column: str | None = None,
             label_column: str | None = None, force: bool = False, trust_remote_code: bool = False,
             backends: set[str] | None = None, features: set[str] | None = None, batch_invariant: bool = False,
             student_init: list[str] | None = None, device: str = "auto", search_again: bool = False,
             reporter: Reporter | None = None) -> SearchResult:
    """Search for the fastest artifact that meets ``gates`` on ``data``; see the module doc.

    Raises ``UserError`` (exit 2) on bad input before any model loads, ``GateFailed``
    (exit 1) when no candidate passes (the best-scoring one is kept as ``OUT.rejected``).
    The same search finished before: its result replayed (``search_again``: searched again)."""
    from bertexport.building.checkpoint import load_model, load_tokenizer, model_max_length, resolve_checkpoint
    from bertexport.judging.compare import reference_runner
    from bertexport.core.envinfo import cpu_features
    from bertexport.shipping.runtime import TextEncoder
    from bertexport.core.staging import REJECTED_SUFFIX, StagedFolder, WorkFolder, check_destination, check_writable
    from bertexport.core.textdata import load_texts

    reporter = reporter or Reporter()
    t_called = time.monotonic()
    budget_s = parse_budget(budget)
    threads = threads or os.cpu_count() or 1
    if threads < 1 or batch < 1 or sequence < 1:
        raise UserError("threads, batch and sequence must be >= 1")
    if not 0 < search_fraction < 1:
        raise UserError("search_fraction must be between 0 and 1")
    requested_backends = None if backends is None else sorted(backends)
    backends = check_backends(backends)  # --backend: unknown or not installed -> exit 2 before any work
    ckpt = resolve_checkpoint(model, task, trust_remote_code=trust_remote_code)
    students = plan_students(distill, ckpt)  # shapes checked against the model, before any work
    pruning = plan_pruning(prune, ckpt)  # MAC budgets checked against the model, before any work
    out = Path(out).expanduser().resolve()
    check_destination(out, force, [ckpt.path], "artifact folder")
    weights = sum(p.stat().st_size for p in ckpt.weight_files)
    check_writable(out, int(weights * 1.5), "artifact")
    if calib:
        load_texts(calib)  # refuse a bad calibration file now
    if distill_data:
        load_texts(distill_data)
    ts = load_texts(data, text_column, label_column) if data else None
    if ts is None:
        from bertexport.core.textdata import TextSet, builtin_calibration

        ts = TextSet(builtin_calibration(), source="builtin:calib")
    labels = task_labels(ts, ckpt.task, ckpt.id2label)
    gates = (gates or Gates()).check()
    if not gates.any():  # the registry's defaults: 1 point of the labelled task metric, else 98 % agreement
        gates = dataclasses.replace(default_gates(labels is not None), confidence=gates.confidence)
    check_gates_fit(gates, ckpt.task, labels is not None)
    check_classes(ts, labels, gates)
    exits = plan_exit_search(early_exit, ckpt, bool(ts.pairs))  # --early-exit on a model it cannot serve: exit 2 now
    # --student-init: vocabulary, family, size and task checked from configs and tokenizers (no weights)
    inits = plan_init_students(student_init, ckpt, ts.texts)
    train_device = training_device(device)  # --device cuda without a GPU: exit 2 now
    if len(ts.texts) < 20:
        raise UserError(f"{len(ts.texts)} texts are too few to search on (need >= 20: a search and a confirm slice)")
    features = cpu_features() if features is None else set(features)
    recipes = candidate_recipes(features, backends)
    if not recipes:
        raise UserError("no backend to search over: install onnxruntime and/or openvino (bertexport[runtime], [openvino])")
    search_slice, confirm_slice = split_slices(ts, labels, search_fraction, seed, max_search_rows)
    # the held-out verdict must be one its rows can resolve (refused now, not after the search)
    need = max(rows_needed(gates).values(), default=0)
    total = next((m for m in range(need, 100 * need + 2) if m - min(max(1, int(m * search_fraction)), max_search_rows) >= need), need)
    check_gates_resolvable(gates, len(confirm_slice.data.texts), "the held-out confirm slice",
                           f" (give >= {total} rows in all: {search_fraction:.0%} of them, at most {max_search_rows}, "
                           "go to the search slice)")
    memo = memo_key(ckpt, cache_key(ts.texts, ts.pairs, ts.labels), {  # what decides the outcome (``search.replay``)
        "task": ckpt.task, "gates": dataclasses.asdict(gates), "budget_seconds": budget_s, "distill": distill,
        "distill_epochs": distill_epochs, "prune": prune, "early_exit": early_exit, "threads": threads, "batch": batch,
        "sequence": sequence, "search_fraction": search_fraction, "max_search_rows": max_search_rows, "seed": seed,
        "backends": sorted(backends), "features": sorted(features), "batch_invariant": batch_invariant,
        "device": train_device, "trust_remote_code": trust_remote_code},
        {"distill_data": distill_data, "calib": calib}, [shape.init.path for shape in inits])
    if not search_again:
        done, why = load_memo(memo)
        if done is not None:
            return _replay(done, out, force, ckpt, gates, reporter, time.monotonic() - t_called)
        if why:
            reporter.log(f"this search ran before, but {why}: searching again")
    t_start = time.monotonic()
    deadline = t_start + budget_s
    reporter.log(f"search slice {len(search_slice.data.texts)} texts, confirm slice {len(confirm_slice.data.texts)}; "
                 f"gate {gates.given()}; budget {budget_s:.0f} s; CPU features {', '.join(sorted(features)) or 'none detected'}")

    with reporter.step(f"load {ckpt.family} original ({ckpt.task})"):
        torch_model = load_model(ckpt)
        tokenizer = load_tokenizer(ckpt)
    with WorkFolder("optimize") as work:
        tok_dir = work / "tokenizer"
        tokenizer.save_pretrained(tok_dir)
        from bertexport.building.export import export_onnx

        with reporter.step("export ONNX (cached)"):
            exported = export_onnx(ckpt, torch_model, 18)
        encoder = TextEncoder.from_folder(tok_dir, exported.input_names, model_max_length(ckpt.config, tokenizer))
        reference = reference_runner(ckpt, exported.input_names, threads, torch_model=torch_model)
        reference.activate()
        search = Search(ckpt=ckpt, task=ckpt.task, gates=gates, reference=reference, encode=encoder.encode,
                         search_slice=search_slice, confirm_slice=confirm_slice, deadline=deadline, threads=threads, batch=batch,
                         sequence=sequence, calib=calib, reporter=reporter, trust_remote_code=trust_remote_code,
                         batch_invariant=batch_invariant)
        ranking: list[dict] | None = None
        for cand in recipes:
            t = search.try_candidate(cand, str(ckpt.path))
            if t.status in ("failed", "undecided") and cand.int8 and search.remaining() > 0:
                if ranking is None:
                    with reporter.step("rank regions by harm (each quantized alone)"):
                        ranking = region_ranking(search, str(ckpt.path), torch_model)
                    reporter.log("most harmful: " + ", ".join(f"{r['region']} ({r['harm']:.4f})" for r in ranking[:6] if r["harm"] is not None))
                search.restore_ladder(cand, [r["region"] for r in ranking], str(ckpt.path))
        early = search_early_exit(search, plan=exits, ckpt=ckpt, recipes=recipes, seed=seed)
        pruner = pruned_search(search, plan=pruning, ckpt=ckpt, teacher_model=torch_model, tokenizer=tokenizer,
                               recipes=recipes, seed=seed)
        if pruner is not None:  # with students, only the most aggressive budget before them: it can start one
            pruner.run(count=1 if students or inits else None)
        found = search_students(search, ckpt=ckpt, teacher_model=torch_model, tokenizer=tokenizer, tok_dir=tok_dir, shapes=students,
                                recipes=recipes, distill_data=distill_data, epochs=distill_epochs, seed=seed, inits=inits,
                                device=device, pruned=pruner.section() if pruner else None) if students or inits else {}
        if pruner is not None:  # the larger budgets, each only if no passing candidate is already faster than it can be
            pruner.run()
        pruned = pruner.section() if pruner else None

        passing = sorted([t for t in search.trials if t.status == "passed"], key=lambda t: t.latency_ms)  # all confirmed
        anchor = next((t for t in search.trials if t.candidate.anchor and t.artifact), None)
        final = _final_timing(passing[:4], anchor, reference, encoder, batch, sequence, threads, reporter,
                              exit_paths=exit_mix(early))
        ranked = rank_by_final_timing(passing[:4], final)
        winner = ranked[0] if ranked else None
        confirm = winner.confirm_metrics if winner else None
        reference.deactivate()
        elapsed = time.monotonic() - t_start
        chosen = winner or _best_scoring(search.trials)
        report = build_report(ckpt, gates, search, ranking, final, winner, confirm, search_slice, confirm_slice, budget_s, elapsed,
                         threads, batch, sequence, features, backends)
        # the backends searched; "restricted": the user named them (--backend), e.g. the device's runtime
        report["backends"] = sorted(backends)
        report["backends_restricted"] = requested_backends is not None
        report["batch_invariant"] = batch_invariant
        report["within_noise"] = [t.candidate.name for t in search.trials if t.noise]
        report["students"], report["cost_model"] = found.get("students"), found.get("cost_model")
        report["training_device"] = train_device if students or inits else None
        report["pruning"] = pruned
        if early is not None:  # --early-exit auto|on (off: search.json as before)
            report["early_exit"] = early
        if chosen is None:
            raise UserError("no candidate could be built on this machine: " + "; ".join(f"{t.candidate.name}: {t.reason}" for t in search.trials[:4]))
        with StagedFolder(out, force, [ckpt.path], "artifact folder") as staged:
            _publish(Path(chosen.artifact), staged.staging, report, winner is not None, chosen.candidate.name,
                     chosen.candidate.runtime)
            published = staged.publish(winner is not None)
        save_memo(memo, report, chosen.artifact, chosen.candidate.name, chosen.candidate.runtime, winner is not None)
    result = SearchResult(published, winner is not None, report)
    if winner is None:
        raise GateFailed([f"no candidate met the gate {gates.given()}; the best-scoring one is kept as {out.name}{REJECTED_SUFFIX}"], result)
    return result


def optimize_command(settings: OptimizeSettings, reporter: Reporter | None = None) -> SearchResult:
    """``bertexport optimize`` as a library call: ``optimize`` with the record's settings
    (its gates; no backend given: every installed one). Raises like ``optimize``."""
    s = settings
    return optimize(s.model, s.data, s.out, task=s.task, gates=s.gates(), budget=s.budget, distill=s.distill,
                    batch_invariant=s.batch_invariant, distill_epochs=s.distill_epochs, distill_data=s.distill_data,
                    prune=s.prune, early_exit=s.early_exit, threads=s.threads, batch=s.batch, sequence=s.sequence, calib=s.calib,
                    text_column=s.text_column, label_column=s.label_column, seed=s.seed, force=s.force,
                    trust_remote_code=s.trust_remote_code, backends=set(s.backends) or None,
                    student_init=list(s.student_init), device=s.device, search_again=s.search_again, reporter=reporter)


def check_classes(ts, labels, gates: Gates) -> None:
    """Refuse (before any model loads) labelled data of one class under a gate that reads the
    labels. An accuracy gate cannot see a change on rows it does not have: a build that moves
    every decision the data never shows would pass it. Not quietly gated on agreement
    instead: that is another gate than the one asked for, so the user chooses it."""
    import numpy as np

    from bertexport.judging.gates import GATES

    labelled = [GATES[name].flag for name in gates.thresholds() if GATES[name].needs_labels]
    if labels is None or not labelled or len(np.unique(labels)) > 1:
        return
    raise UserError(f"{ts.source or 'the data'}: every row has the same label ({ts.labels[0]!r}), so "
                    f"{' and '.join(labelled)} cannot see a change on the classes it has no rows of; give rows of two "
                    "or more classes, or gate on agreement (--min-agreement 0.98; it needs no labels)")


def _final_timing(passing, anchor, reference, encoder, batch, sequence, threads, reporter, exit_paths=None) -> dict:
    """The passing candidates and the anchor timed interleaved (60 rounds): this run picks
    the winner. PyTorch is timed in a second run with them, for the "vs PyTorch" ratio
    only: in the rotation its threads keep spinning after its turn and slow whichever
    candidate follows (measured here: it turned a 1.4x-faster student into a slower one).
    An early-exit artifact (``exit_paths``: name -> each exit path's share of search-slice rows)
    is timed one exit path per call and folded back per round into its mean row cost
    (``search.early_exit_candidate``)."""
    from bertexport.judging.compare import fixed_cell_feeds
    from bertexport.judging.latency import speedup, time_interleaved
    from bertexport.search.exit_paths import fold_paths, path_calls
    from bertexport.shipping.runtime import Artifact
    from bertexport.core.textdata import builtin_samples

    trials = {t.candidate.name: t for t in passing}
    if anchor is not None:
        trials.setdefault(anchor.candidate.name, anchor)
    if not trials:
        return {}
    feeds = fixed_cell_feeds(encoder.encode, builtin_samples(), batch, sequence)
    arts = {n: Artifact(t.artifact, threads=threads, allow_rejected=True, runtime_overrides=t.candidate.runtime)
            for n, t in trials.items()}
    for a in arts.values():
        a.runner.activate()
    try:
        calls = path_calls({n: (lambda a=a: a.infer(feeds)) for n, a in arts.items()}, arts, exit_paths or {}, feeds)
        with reporter.step(f"time {len(arts)} candidates interleaved, b{batch}/s{sequence}, {threads} thread(s)"):
            timed = fold_paths(time_interleaved(calls, runs=60, warmup=5), exit_paths or {})
        with reporter.step("time PyTorch with them (for the vs-PyTorch ratio only)"):
            with_torch = fold_paths(time_interleaved({"pytorch": lambda: reference.infer(feeds)} | calls, runs=15, warmup=3),
                                    exit_paths or {})
    finally:
        for a in arts.values():
            a.runner.deactivate()
    anchor_lat = timed.get(anchor.candidate.name) if anchor is not None else None
    singles = {n: lat for n, lat in timed.items() if n not in (exit_paths or {})}
    fastest_single = min(singles, key=lambda n: singles[n].p50) if singles else None
    out = {"pytorch": {"p50_ms": with_torch["pytorch"].p50 * 1e3, "p90_ms": with_torch["pytorch"].p90 * 1e3,
                       "vs_pytorch": 1.0, "vs_anchor": None}}
    for n, lat in timed.items():
        out[n] = {"p50_ms": lat.p50 * 1e3, "p90_ms": lat.p90 * 1e3,
                  "vs_pytorch": speedup(with_torch["pytorch"], with_torch[n])["p50_ratio"],
                  "vs_anchor": (anchor_lat.p50 / lat.p50) if anchor_lat is not None else None,
                  "vs_anchor_p10_p90": [speedup(anchor_lat, lat)["round_ratio_p10"], speedup(anchor_lat, lat)["round_ratio_p90"]]
                  if anchor_lat is not None else None}
        if n in (exit_paths or {}) and fastest_single is not None:  # for ``rank_by_final_timing``
            out[n]["vs_fastest_single"] = {"name": fastest_single} | speedup(singles[fastest_single], lat)
    return out


def rank_by_final_timing(passing: list[Trial], final: dict) -> list[Trial]:
    """The passing candidates fastest first by the final interleaved timing, except that an
    early-exit artifact ranks first only when it beats the fastest single model in at least
    90 % of the interleaved rounds (``vs_fastest_single``: round ratio p10 above 1). Its
    segments run in turn and its cost on real rows moves with each row's length and exit
    (measured on the news topics, 2026-12-03: 0.5 % ahead at the fixed cell, within the
    noise, and 11 % slower per row at the rows' own lengths), so it must win clearly."""
    ranked = sorted(passing, key=lambda t: final.get(t.candidate.name, {}).get("p50_ms", t.latency_ms))
    if ranked and ranked[0].candidate.early_exit:
        clear = (final.get(ranked[0].candidate.name, {}).get("vs_fastest_single") or {}).get("round_ratio_p10")
        single = next((t for t in ranked if not t.candidate.early_exit), None)
        if single is not None and (clear is None or not clear > 1.0):
            ranked.remove(single)
            ranked.insert(0, single)
    return ranked


def _best_scoring(trials: list[Trial]) -> Trial | None:
    """The failed candidate closest to passing (lowest metric drop, then highest agreement/cosine)."""
    scored = [t for t in trials if t.artifact and t.metrics]
    if not scored:
        return next((t for t in trials if t.artifact), None)
    return min(scored, key=lambda t: (t.metrics.get("metric_drop", 0.0), -(t.metrics.get("agreement") or 0.0),
                                      -t.metrics.get("cosine_min", 0.0)))


def _replay(memo, out: Path, force: bool, ckpt, gates: Gates, reporter: Reporter, seconds: float) -> SearchResult:
    """A finished search's result published again (``bertexport.search.replay``); raises like ``optimize``."""
    from bertexport.core.staging import REJECTED_SUFFIX, StagedFolder
    from bertexport.search.replay import SAME_AS_BEFORE

    report = memo.report | {"replayed": {"search_created": memo.report.get("created") or memo.created,
                                         "memo_created": memo.created, "seconds": round(seconds, 1)}}
    reporter.log(f"this search ran on {memo.created} with {SAME_AS_BEFORE}: "
                 "its result replayed (--search-again to search again; a larger --budget searches further)")
    with StagedFolder(out, force, [ckpt.path], "artifact folder") as staged:
        _publish(memo.build, staged.staging, report, memo.passed, memo.name, memo.runtime)
        published = staged.publish(memo.passed)
    result = SearchResult(published, memo.passed, report)
    if not memo.passed:
        raise GateFailed([f"no candidate met the gate {gates.given()} (replayed search); the best-scoring one is kept as "
                          f"{out.name}{REJECTED_SUFFIX}"], result)
    return result


def _publish(build: Path, staging: Path, report: dict, passed: bool, name: str, runtime: dict | None) -> None:
    """The chosen build as a normal artifact, with the search record in its manifest and
    search.json/.md/.png beside the model (all listed in the file table)."""
    from bertexport.core.manifest import MANIFEST, load_manifest, write_manifest

    manifest = load_manifest(build)
    for p in build.iterdir():
        if p.name != MANIFEST:
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, staging / p.name)
    (staging / "search.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (staging / "search.md").write_text(to_markdown(report))
    try:
        plot(report, staging / "search.png")
    except ImportError:
        pass
    manifest["status"] = "passed" if passed else "rejected"
    manifest["target"] |= {"name": name, "runtime": runtime, "description": f"optimize winner: {name}"}
    if not passed:
        manifest.setdefault("parity", {})["failures"] = ["optimize: no candidate met the gate"]
    manifest["search"] = {k: report[k] for k in ("gate", "data", "budget_seconds", "elapsed_seconds", "cell", "winner",
                                                 "backends", "backends_restricted", "batch_invariant", "students",
                                                 "pruning")} | {
        k: report[k] for k in ("early_exit", "replayed") if k in report} | {
        "candidates": [{"name": c["candidate"]["name"], "status": c["status"], "reason": c["reason"],
                        "latency_ms": c["latency_ms"], "metrics": c["metrics"], "within_noise": c["within_noise"],
                        "batch_invariance": c["batch_invariance"]} for c in report["candidates"]]}
    manifest.pop("files", None)
    write_manifest(staging, manifest)
