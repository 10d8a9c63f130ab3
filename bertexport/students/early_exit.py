"""Early exit for sequence classification (DeeBERT, FastBERT): exit heads after chosen
layers of the teacher itself, trained with the body frozen, shipped as consecutive ONNX
segments that the torch-free runtime runs in order (``shipping.runtime.EarlyExitRunner``).

The body is never trained, so the last segment gives the teacher's answers exactly and a
threshold of 1.0 gives the no-exit model. This module plans (every refusal before work) and
builds the artifact; its parts live beside it:

- ``exit_heads``: the teacher's first-token states at each exit, cached in one pass, and one
  head per exit trained on them (KL to the teacher, + cross-entropy on labels);
- ``exit_segments``: the model cut after each exit layer, exported to ONNX, each segment
  compiled by the profile's passes (ort-int8, openvino-int8, ...) on the inputs it sees;
- ``exit_threshold``: the smallest threshold (scanning down from 1.0) at which the compiled
  segments' decisions still agree with the full model's on at least ``agreement`` of the
  held-out rows, and per-row latency at it and with no row exiting (the worst case).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bertexport.core.errors import GateFailed, UserError
from bertexport.students.exit_heads import teacher_states, train_heads
from bertexport.students.exit_segments import MODEL_DIR, TASK, compile_segments, export_segments, model_input_names, segment_modules
from bertexport.students.exit_threshold import RULE, choose_threshold, row_latency, runner_outputs, simulate

MIN_TEXTS = 20  # fewer cannot both train heads and hold rows out to choose a threshold on
CALIBRATION_TEXTS = 300  # training texts a profile's passes calibrate each segment on (as convert's calib_samples)


@dataclass
class EarlyExitConfig:
    exit_layers: list[int] | None = None  # layer counts after which an exit sits (default: every 2nd)
    agreement: float = 0.99  # held-out agreement with the full model the chosen threshold keeps
    threshold: float | None = None  # a fixed threshold instead of a chosen one
    heldout_fraction: float = 0.3
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    temperature: float = 2.0
    alpha_ce: float = 0.5  # cross-entropy weight when the data has labels
    max_length: int = 128  # tokens of a training text (the artifact keeps the model's own maximum)
    seed: int = 0

    def check(self) -> "EarlyExitConfig":
        if not 0.0 < self.agreement <= 1.0:
            raise UserError(f"the exit agreement gate must be in (0, 1], not {self.agreement}")
        if self.threshold is not None:
            from bertexport.shipping.runtime import check_exit_threshold

            check_exit_threshold(self.threshold)
        if not 0.05 <= self.heldout_fraction <= 0.9:
            raise UserError("the held-out fraction must be in [0.05, 0.9]")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 8:
            raise UserError("epochs and batch size must be >= 1, max length >= 8")
        return self


def default_exit_layers(layers: int) -> list[int]:
    """Every second layer before the last (after layer 2, 4, ...); after layer 1 for a model of
    2 or 3 layers."""
    every_second = list(range(2, layers, 2))
    return every_second or ([1] if layers >= 2 else [])


def check_exit_layers(exit_layers: list[int] | None, layers: int) -> list[int]:
    chosen = default_exit_layers(layers) if not exit_layers else sorted(set(int(x) for x in exit_layers))
    if not chosen:
        raise UserError(f"a model of {layers} layer(s) has no layer to exit after: early exit needs >= 2 layers")
    bad = [x for x in chosen if not 1 <= x < layers]
    if bad:
        raise UserError(f"exit layers must be in [1, {layers - 1}] for a model of {layers} layers (an exit after the "
                        f"last layer is the model itself): {', '.join(map(str, bad))}")
    return chosen


# The passes a segment can go through: each takes one ONNX file and the inputs it sees (the
# segment's own, from ``segment_encoder``). Not here: first-token-skip and int8-embeddings
# start from the whole PyTorch model; TensorRT engines are built for the model's own inputs.
SEGMENT_PASSES = ("ort-transformers-optimize", "ort-dynamic-quantize", "ort-static-quantize", "openvino-convert",
                  "openvino-compress-weights", "nncf-quantize")
SEGMENT_BACKENDS = ("onnxruntime", "openvino")


def check_segment_profile(profile, family) -> None:
    """Refuse (``UserError``, before any model loads) a profile whose recipe cannot be applied
    to each segment: another backend, a pass that needs the whole model, a region kept float
    at a given layer (a segment numbers its layers from 0), or OpenVINO converting from PyTorch."""
    from bertexport.building.passes import get_pass

    what = (f"early exit builds segments for ONNX Runtime and OpenVINO profiles whose passes each take a segment "
            f"({', '.join(SEGMENT_PASSES)}; e.g. ort-fp32, ort-int8, ort-fused-int8, openvino-int8)")
    if profile.backend not in SEGMENT_BACKENDS:
        raise UserError(f"{what}; {profile.name} is a {profile.backend} profile")
    others = [p.type for p in profile.passes if p.type not in SEGMENT_PASSES]
    if others:
        raise UserError(f"{what}; {profile.name} has {', '.join(others)}")
    for spec in profile.passes:
        at_layer = [r for r in spec.config.get("keep_float", []) if "@" in r]
        if at_layer:
            raise UserError(f"{what}; {profile.name} keeps {', '.join(at_layer)} float, and a segment numbers its layers "
                            f"from 0: give the region without @LAYER")
        if spec.type == "openvino-convert":
            source = get_pass(spec.type).make_config(spec.config).source
            if source == "pytorch" or (source == "auto" and family.openvino_source == "pytorch"):
                raise UserError(f"{what}; OpenVINO converts {family.display} from PyTorch, and segments are converted "
                                f"from their ONNX files")


@dataclass
class EarlyExitPlan:
    convert: object  # building.convert.ConvertPlan
    config: EarlyExitConfig
    exit_layers: list[int]
    layers: int
    texts: list[str]
    labels: np.ndarray | None
    data_source: str


def plan_early_exit(model: str, target, out, data, *, config: EarlyExitConfig | None = None, text_column: str | None = None,
                    label_column: str | None = None, **convert_kw) -> EarlyExitPlan:
    """Everything checked before any model loads: the convert plan (profile, checkpoint,
    destination, gates), the task (text-classification only), the profile (one whose passes
    each take a segment: ``check_segment_profile``), the family (one list of layers), the exit
    layers and the data."""
    from bertexport.building.convert import plan_convert
    from bertexport.core.families import get_family
    from bertexport.core.textdata import label_ids, load_texts

    config = (config or EarlyExitConfig()).check()
    if data is None:
        raise UserError("early exit trains its heads on your texts: give the data file")
    plan = plan_convert(model, target, out, text_column=text_column, **convert_kw)
    ckpt, profile = plan.ckpt, plan.profile
    if ckpt.task != TASK:
        raise UserError(f"early exit serves text-classification only; {ckpt.path} is a {ckpt.task} model")
    family = get_family(ckpt.family)
    check_segment_profile(profile, family)
    if family.layers_module is None or family.shared_layers:
        raise UserError(f"early exit needs one list of transformer layers; {family.display} does not have one")
    layers = int(family.config_value(ckpt.config, family.layers_key, 0))
    exit_layers = check_exit_layers(config.exit_layers, layers)
    ts = load_texts(data, text_column, label_column)
    if len(ts.texts) < MIN_TEXTS:
        raise UserError(f"{data} has {len(ts.texts)} texts: early exit needs >= {MIN_TEXTS} (to train heads and hold rows out)")
    labels = label_ids(ts.labels, ckpt.id2label) if ts.labels is not None else None
    return EarlyExitPlan(plan, config, exit_layers, layers, ts.texts, labels, str(data))


# -- the build -------------------------------------------------------------------------------------

@dataclass
class EarlyExitResult:
    artifact: Path
    passed: bool
    failures: list[str]
    manifest: dict
    rows: list[dict] = field(default_factory=list)
    verdict: str = "passed"
    undecided: list[str] = field(default_factory=list)
    signature: Path | None = None


def build_early_exit(model: str, target, out, data, *, config: EarlyExitConfig | None = None, task: str | None = None,
                     samples=None, text_column: str | None = None, label_column: str | None = None, force: bool = False,
                     threads: int = 1, latency_runs: int | None = None, allow_pickle: bool = False,
                     trust_remote_code: bool = False, revision: str | None = None, reporter=None, calib=None,
                     gates=None) -> EarlyExitResult:
    """An early-exit artifact of ``model`` (a text classifier) in ``out``: heads trained on
    ``data``, ONNX segments compiled by the profile's passes (``compile_segments``; calibrated on
    the training rows of ``data``), parity of the no-exit path against PyTorch by the profile's
    gates (or ``gates``: ``optimize`` gives none, as for every build it judges on its own slice;
    on ``samples`` or the built-in texts), the threshold (``config.threshold`` or chosen on
    held-out rows through the compiled segments), latency per held-out row. Raises ``UserError`` before any model loads for bad input
    and ``GateFailed`` (kept as ``<out>.rejected``) when parity fails."""
    from bertexport.building.checkpoint import load_model, load_tokenizer, model_max_length
    from bertexport.building.convert import TOKENIZER_DIR, _write_side_files
    from bertexport.building.report import render_report, summary_rows
    from bertexport.core.envinfo import cpu_count, environment
    from bertexport.core.families import get_family
    from bertexport.core.manifest import Manifest, manifest_header, write_manifest
    from bertexport.core.progress import Reporter
    from bertexport.core.staging import StagedFolder, WorkFolder
    from bertexport.judging.compare import batch_invariance, parity_checks, reference_runner
    from bertexport.judging.gates import judge_checks, profile_status
    from bertexport.backends import get_backend
    from bertexport.building.export import io_specs
    from bertexport.core.textdata import sample as sample_texts
    from bertexport.shipping.runtime import EarlyExitRunner, TextEncoder

    reporter = reporter or Reporter()
    if calib is not None:
        raise UserError("an early-exit build calibrates on its own texts (the --early-exit data): it takes no calibration file")
    plan = plan_early_exit(model, target, out, data, config=config, text_column=text_column, label_column=label_column,
                           task=task, samples=samples, force=force, threads=threads, allow_pickle=allow_pickle,
                           trust_remote_code=trust_remote_code, revision=revision, gates=gates)
    cfg, cp = plan.config, plan.convert
    ckpt, profile, out = cp.ckpt, cp.profile, cp.out
    family = get_family(ckpt.family)
    import torch

    with reporter.step(f"load {ckpt.family} checkpoint ({ckpt.task})"):
        torch_model = load_model(ckpt)
        tokenizer = load_tokenizer(ckpt)
    max_length = model_max_length(ckpt.config, tokenizer)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(plan.texts))
    n_held = max(1, int(round(len(order) * cfg.heldout_fraction)))
    held, train = sorted(order[:n_held].tolist()), sorted(order[n_held:].tolist())

    with StagedFolder(out, force, [ckpt.path], "artifact folder") as staged, WorkFolder("early-exit") as work:
        _write_side_files(staged.staging, ckpt, tokenizer, max_length)
        tok_dir = staged.staging / TOKENIZER_DIR
        input_names = model_input_names(torch_model, tokenizer)
        encoder = TextEncoder.from_folder(tok_dir, input_names, max_length)
        before = torch.get_num_threads()
        torch.set_num_threads(max(threads, 1))
        try:
            with reporter.step(f"teacher states after layers {', '.join(map(str, plan.exit_layers))} on {len(plan.texts)} texts"):
                states, teacher_logits = teacher_states(torch_model, encoder.encode, plan.texts, plan.exit_layers,
                                                        min(cfg.max_length, max_length))
            with reporter.step(f"train {len(plan.exit_layers)} exit head(s) on {len(train)} texts, body frozen"):
                heads, head_figures = train_heads(torch_model, [s[train] for s in states], teacher_logits[train],
                                                  plan.labels[train] if plan.labels is not None else None, cfg)
            # fp32 segments are the artifact for a profile without passes, else what its passes start from
            fp32_dir = Path(work) / "fp32" if profile.passes else staged.staging / MODEL_DIR
            with reporter.step(f"export {len(plan.exit_layers) + 1} ONNX segments (opset {profile.opset})"):
                segments = segment_modules(torch_model, family, plan.exit_layers, heads, input_names)
                sample = encoder.encode(plan.texts[:2])
                records = export_segments(segments, input_names, fp32_dir, profile.opset, sample)
        finally:
            torch.set_num_threads(before)
        fp32_records = records
        calibration_texts = sample_texts([plan.texts[i] for i in train], CALIBRATION_TEXTS, cfg.seed)
        if profile.passes:
            with reporter.step(f"{profile.name} recipe on each segment (calibrated on {len(calibration_texts)} training texts)"):
                records = compile_segments(profile, fp32_dir, records, staged.staging / MODEL_DIR, encode=encoder.encode,
                                           calibration_texts=calibration_texts, workdir=Path(work) / "passes",
                                           family=ckpt.family, model_config=ckpt.config, threads=threads, reporter=reporter)
        else:
            records = [r | {"format": "onnx", "passes": []} for r in records]
        backend = get_backend(profile.backend)
        early = {"layers": plan.layers, "exit_layers": plan.exit_layers, "threshold": 1.0, "segments": records,
                 "backend": profile.backend, "precision": profile.precision, "format": records[0]["format"]}
        runner = EarlyExitRunner.from_manifest(early, lambda rel: backend.make_runner(staged.staging / rel, profile.runtime, threads))
        reference = reference_runner(ckpt, input_names, threads, torch_model=torch_model)
        with reference, runner:
            with reporter.step(f"validate the no-exit path on {len(cp.validation_texts)} texts"):
                reference.set_threads(cpu_count())
                runner.threshold = 1.0
                checks = parity_checks(reference, runner, encoder.encode, cp.validation_texts, ckpt.task,
                                       profile.validation.padded_length, cp.gates.level)
                invariance = batch_invariance(runner, encoder.encode, cp.validation_texts[:48], ckpt.task)
                reference.set_threads(threads)
            decision = judge_checks(checks, cp.gates)
            failures = list(decision.failures)
            with reporter.step(f"exit confidences on {len(held)} held-out texts"):
                held_texts = [plan.texts[i] for i in held]
                exit_logits, final_logits = runner_outputs(runner, encoder.encode, held_texts)
            choice = choose_threshold(exit_logits, final_logits, plan.exit_layers, plan.layers, cfg.agreement)
            if cfg.threshold is not None:
                decision_at, ran = simulate(exit_logits, final_logits, plan.exit_layers, plan.layers, cfg.threshold)
                choice = {"threshold": cfg.threshold, "given": True,
                          "agreement": float((decision_at == final_logits.argmax(-1)).mean()), "mean_layers": float(ran.mean()),
                          "exits": {str(layer): int((ran == layer).sum()) for layer in [*plan.exit_layers, plan.layers]},
                          "rows": len(held), "chosen_would_be": choice["threshold"]}
            threshold = choice["threshold"]
            reporter.log(f"threshold {threshold:.6g}: held-out agreement {choice['agreement']:.4f}, "
                         f"{choice['mean_layers']:.2f} of {plan.layers} layers on average")
            runs = profile.latency.runs if latency_runs is None else latency_runs
            latency = None
            if runs > 0:
                with reporter.step(f"latency per held-out row (batch 1), {runs} interleaved runs each"):
                    latency = row_latency(runner, encoder.encode, held_texts, threshold, runs) | {"threads": threads}
            load_seconds = runner.load_seconds
        early |= {"threshold": threshold, "rule": RULE, "agreement_gate": cfg.agreement,
                  "choice": choice, "heads": head_figures, "latency": latency,
                  "data": {"source": plan.data_source, "texts": len(plan.texts), "train": len(train), "heldout": len(held),
                           "labels": plan.labels is not None},
                  "training": {"epochs": cfg.epochs, "lr": cfg.lr, "temperature": cfg.temperature,
                               "alpha_ce": cfg.alpha_ce if plan.labels is not None else 0.0, "seed": cfg.seed}}
        ins, _ = io_specs(fp32_dir / Path(fp32_records[0]["path"]).name)  # the compiled segments keep these names
        _, outs = io_specs(fp32_dir / Path(fp32_records[-1]["path"]).name)
        passed = not failures
        env = environment()
        manifest = Manifest(**manifest_header(ckpt, passed, max_length), **{
            "model": {"path": records[0]["path"], "format": records[0]["format"], "backend": profile.backend,
                      "opset": profile.opset},
            "tokenizer": TOKENIZER_DIR,
            "labels": "labels.json" if ckpt.id2label else None,
            "inputs": [t.to_dict() for t in ins],
            "outputs": [t.to_dict() for t in outs] + [{"name": "exit_layer", "dtype": "int64", "shape": ["batch"]}],
            "target": {"name": profile.name, "backend": profile.backend, "precision": profile.precision,
                       "description": profile.description, "runtime": profile.runtime,
                       "shapes": {"batch": profile.batch.__dict__, "sequence": profile.sequence.__dict__},
                       # each segment went through these (its own notes: early_exit.segments[k].passes)
                       "passes": [{"type": h["type"], "config": h["config"]} for h in records[0]["passes"]]},
            "calibration": {"source": f"{plan.data_source} (training rows)", "count": len(calibration_texts), "seed": cfg.seed,
                            "skipped": {}} if profile.passes else None,
            "parity": {"texts": len(cp.validation_texts), "source": cp.validation_source, "path": "no exit (threshold 1.0)",
                       "gates": cp.gates.given(), "rule": None if gates else profile.validation.rule,
                       "checks": checks, "passed": passed, "verdict": profile_status(decision), "failures": failures,
                       "undecided": decision.undecided, "within_noise": decision.within_noise,
                       "verdicts": [v.to_dict() for v in decision.verdicts]},
            "batch_invariance": invariance,
            "latency": None,
            "early_exit": early,
            "load_seconds": load_seconds,
            "sizes": {"source_weights_bytes": sum(p.stat().st_size for p in ckpt.weight_files),
                      "model_bytes": sum(f.stat().st_size for f in (staged.staging / MODEL_DIR).iterdir())},
            "threads": threads,
            "versions": env["packages"] | backend.versions(),
            "environment": {k: v for k, v in env.items() if k != "packages"},
        }).to_dict()
        rows = summary_rows(manifest)
        (staged.staging / "report.md").write_text(render_report(manifest, rows) + "\n" + early_exit_report(early))
        manifest = write_manifest(staged.staging, manifest)
        artifact = staged.publish(passed)
    result = EarlyExitResult(artifact, passed, failures, manifest, rows, profile_status(decision), decision.undecided)
    if not passed:
        raise GateFailed(failures, result)
    return result


def early_exit_report(early: dict) -> str:
    """The early-exit section of ``report.md``."""
    c = early["choice"]
    lines = ["## Early exit", "",
             f"- exits after layers {', '.join(map(str, early['exit_layers']))} of {early['layers']}; {early['rule']}",
             f"- threshold **{early['threshold']:.6g}** ({'given' if c.get('given') else 'chosen'}; agreement gate "
             f"{early['agreement_gate']}): held-out agreement with the full model {c['agreement']:.4f} on {c['rows']} rows, "
             f"{c['mean_layers']:.2f} layers per row on average",
             "- rows leaving at each exit: " + ", ".join(f"after {k}: {v}" for k, v in c["exits"].items())]
    lat = early.get("latency")
    if lat:
        a, w = lat["at_threshold"], lat["no_exit"]
        lines.append(f"- latency per row (batch 1, {lat['rows']} held-out rows, {lat['threads']} thread(s)): mean "
                     f"{a['mean'] * 1e3:.2f} ms, p90 {a['p90'] * 1e3:.2f} ms at the threshold; worst case (no row exits) "
                     f"mean {w['mean'] * 1e3:.2f} ms, p90 {w['p90'] * 1e3:.2f} ms")
    return "\n".join(lines) + "\n"
