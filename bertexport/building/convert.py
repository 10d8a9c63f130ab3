"""``convert``: checkpoint -> ONNX -> target passes -> validated artifact folder."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bertexport.core.staging import (REJECTED_SUFFIX, StagedFolder, WorkFolder, check_destination, check_writable,
                                made_by_bertexport)
from bertexport.backends import get_backend
from bertexport.core.cache import cache_dir
from bertexport.building.checkpoint import (Checkpoint, load_model, load_tokenizer, model_max_length, resolve_checkpoint,
                                   sentence_pooling)
from bertexport.core.envinfo import cpu_count, environment
from bertexport.core.errors import GateFailed, UserError
from bertexport.core.families import get_family
from bertexport.building.export import ExportedModel, export_onnx
from bertexport.judging.latency import speedup, time_interleaved
from bertexport.core.manifest import Manifest, manifest_header, write_manifest
from bertexport.judging.compare import batch_invariance, fixed_cell_feeds, parity_checks, reference_runner
from bertexport.judging.gates import Gates, check_gates_resolvable, judge_checks, profile_status
from bertexport.core.tasks import get_task
from bertexport.building.passes import ModelFile, PassContext, config_dict, get_pass
from bertexport.building.profiles import TargetProfile, load_profile
from bertexport.core.progress import Reporter
from bertexport.building.report import render_report, summary_rows
from bertexport.shipping.runtime import TextEncoder
from bertexport.core.textdata import builtin_calibration, builtin_samples, builtin_validation, load_texts, sample

MODEL_DIR = "model"
# fill-mask outputs a vocabulary of logits per token: comparing them on every built-in text
# cost 9x a 48-text check (tiny BERT: 2.4 -> 21 s CPU); 192 texts keep its per-token
# decisions resolved (the int8 rule needs 40 rows) at a third of that
VOCABULARY_TASKS = ("fill-mask",)
VOCABULARY_TASK_TEXTS = 192
INVARIANCE_TEXTS = 48  # texts the batch-invariance declaration is measured on (each alone, then in one batch)
TOKENIZER_DIR = "tokenizer"


@dataclass
class ConvertResult:
    artifact: Path
    passed: bool
    failures: list[str]
    manifest: dict
    rows: list[dict] = field(default_factory=list)
    verdict: str = "passed"  # passed, failed, or undecided (kept: the texts could not decide the gate)
    undecided: list[str] = field(default_factory=list)
    signature: Path | None = None  # the signature file when the command signed the artifact


def _copy_model(model: ModelFile, dest_dir: Path) -> Path:
    """Copy the final model file(s) into the artifact; returns the main file's new path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    for f in model.files:
        shutil.copy2(f, dest_dir / f.name)
    return dest_dir / model.path.name


def _run_passes(profile: TargetProfile, exported: ExportedModel, ctx: PassContext, reporter: Reporter):
    current = ModelFile(exported.path, "onnx")
    history = []
    for spec in profile.passes:
        cls = get_pass(spec.type)
        config = cls.make_config(spec.config)
        if current.format != cls.input_format:
            raise UserError(f"profile {profile.name}: pass '{spec.type}' takes {cls.input_format}, but the previous step made {current.format}")
        step_dir = ctx.workdir / f"{len(history):02d}-{spec.type}"
        step_dir.mkdir()
        step_ctx = PassContext(**{**ctx.__dict__, "workdir": step_dir})
        with reporter.step(f"pass {spec.type}"):
            current = cls().run(current, config, step_ctx)
        history.append({"type": spec.type, "config": config_dict(config), "notes": current.notes})
    return current, history


def _write_side_files(staging: Path, ckpt: Checkpoint, tokenizer, max_length: int) -> None:
    tok_dir = staging / TOKENIZER_DIR
    tokenizer.save_pretrained(tok_dir)
    if not (tok_dir / "tokenizer.json").is_file():
        raise UserError("the tokenizer has no fast (tokenizer.json) form; the device runtime needs one")
    for f in tok_dir.iterdir():  # keep what the runtime needs; slow-tokenizer vocab stays for transformers users
        if f.name == "chat_template.jinja":
            f.unlink()
    # the few fields a runtime needs, and the shape fields that say what a (student) model is
    shape = get_family(ckpt.family).shape_keys  # depth, width, heads and FFN size, as the family's config spells them
    keep = {k: ckpt.config[k] for k in dict.fromkeys(("model_type", "architectures", "hidden_size", "max_position_embeddings",
                                                      "pad_token_id") + shape) if k in ckpt.config}
    (staging / "config.json").write_text(json.dumps(keep | {"max_length": max_length}, indent=2) + "\n")
    labels = ckpt.id2label
    if labels:
        (staging / "labels.json").write_text(json.dumps({str(k): v for k, v in sorted(labels.items())}, indent=2) + "\n")


@dataclass
class ConvertPlan:
    """Everything a convert needs, checked before any model loads (a bad input costs a
    second, not minutes)."""

    profile: TargetProfile
    backend: object
    out: Path
    ckpt: Checkpoint
    validation_texts: list[str]
    calib_set: object
    gates: Gates
    validation_source: str


def plan_convert(model: str, target, out, *, task=None, calib=None, samples=None, force=False, threads=1,
                 allow_pickle=False, trust_remote_code=False, revision=None, gates: Gates | None = None,
                 text_column: str | None = None) -> ConvertPlan:
    """Validate the profile, backend, checkpoint, destination, disk space, text inputs and
    the gate (the profile's, or ``gates``; refused when the validation texts are too few
    to resolve it)."""
    profile = target if isinstance(target, TargetProfile) else load_profile(target)
    gate = (gates or profile.validation.gates()).check()
    backend = get_backend(profile.backend)
    backend.check_available(profile.runtime)  # fail fast (e.g. TensorRT without a GPU) before any export work
    if threads < 1:
        raise UserError("threads must be >= 1")
    out = Path(out).expanduser().resolve()
    ckpt = resolve_checkpoint(model, task, revision=revision, allow_pickle=allow_pickle,
                              trust_remote_code=trust_remote_code)
    for spec in profile.passes:  # a pass that cannot serve this family/task says so now
        get_pass(spec.type).check_checkpoint(ckpt.family, ckpt.task, ckpt.config)
    check_destination(out, force, [ckpt.path], "artifact folder")
    rejected = out.with_name(out.name + REJECTED_SUFFIX)
    if rejected.exists() and made_by_bertexport(rejected) is None:
        raise UserError(f"refusing to use {out}: {rejected} exists and is not a bertexport build")
    weights = sum(p.stat().st_size for p in ckpt.weight_files)
    # the artifact holds at most a float copy of the weights; the cache an export + pass outputs
    check_writable(out, int(weights * 1.2), "artifact")
    check_writable(cache_dir(), int(weights * 3), "export cache (BERTEXPORT_CACHE)")
    # the built-in validation texts when a gate is judged on them; a build with no gate (a
    # search candidate, judged later on the user's data) records parity on the 48 samples only
    builtin = (builtin_validation(), "builtin:validation") if gate.any() else (builtin_samples(), "builtin:samples")
    validation_texts = load_texts(samples, text_column).texts if samples else builtin[0]
    if not samples and ckpt.task in VOCABULARY_TASKS:  # a vocabulary of logits per token: the first texts only
        validation_texts = validation_texts[:VOCABULARY_TASK_TEXTS]
    source = str(samples) if samples else builtin[1]
    check_gates_resolvable(gate, len(validation_texts), f"--data ({samples})" if samples else "the built-in validation texts")
    calib_set = load_texts(calib, text_column) if calib else None
    return ConvertPlan(profile, backend, out, ckpt, validation_texts, calib_set, gate, source)


def convert(
    model: str,
    target: str | Path | TargetProfile,
    out: str | Path,
    *,
    task: str | None = None,
    calib: str | Path | None = None,
    samples: str | Path | None = None,
    text_column: str | None = None,
    force: bool = False,
    threads: int = 1,
    latency_runs: int | None = None,
    calib_samples: int = 300,
    seed: int = 0,
    gates: Gates | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    reporter: Reporter | None = None,
    distill_layers: int | None = None,
    distill_data: str | Path | None = None,
    distill_epochs: int = 3,
) -> ConvertResult:
    """Compile ``model`` for ``target`` into the artifact folder ``out``.

    Raises ``UserError`` for bad input (nothing written) and ``GateFailed`` when the
    artifact misses its parity gates (the profile's [validation], or ``gates``; then it is kept
    as ``<out>.rejected``).
    With ``distill_layers``, ``model`` is first distilled into a student of that many
    layers (cached; see ``bertexport.students.distill.cached_student``) and the student compiled.
    """
    reporter = reporter or Reporter()
    if latency_runs is not None and latency_runs < 0:
        raise UserError("latency_runs must be >= 0")
    kw = dict(task=task, calib=calib, samples=samples, force=force, threads=threads, allow_pickle=allow_pickle,
              trust_remote_code=trust_remote_code, revision=revision, gates=gates, text_column=text_column)
    if distill_layers:
        from bertexport.students.distill import cached_student

        plan_convert(model, target, out, **kw)  # everything checked before the (long) distillation
        model = str(cached_student(model, task, distill_layers, distill_data, distill_epochs, reporter))
    plan = plan_convert(model, target, out, **kw)
    profile, backend, out, ckpt = plan.profile, plan.backend, plan.out, plan.ckpt
    validation_texts, calib_set = plan.validation_texts, plan.calib_set

    with reporter.step(f"load {ckpt.family} checkpoint ({ckpt.task})"):
        torch_model = load_model(ckpt)
        tokenizer = load_tokenizer(ckpt)
    max_length = model_max_length(ckpt.config, tokenizer)
    with reporter.step(f"export ONNX (opset {profile.opset})"):
        exported = export_onnx(ckpt, torch_model, profile.opset)
        if exported.cached:
            reporter.log(f"export reused from cache: {exported.path.parent}")
    calibration_texts = sample(calib_set.texts if calib_set else builtin_calibration(), calib_samples, seed)
    if profile.needs_calibration and len(calibration_texts) < 16:
        raise UserError(f"profile {profile.name} calibrates on data: {len(calibration_texts)} texts are too few (need >= 16)")

    with StagedFolder(out, force, [ckpt.path], "artifact folder") as staged, WorkFolder("convert") as work:
        # The tokenizer ships first, and everything below (calibration, parity) tokenizes
        # with that shipped tokenizer.json through the device runtime's encoder: what is
        # validated is exactly what a device will feed.
        _write_side_files(staged.staging, ckpt, tokenizer, max_length)
        encode = TextEncoder.from_folder(staged.staging / TOKENIZER_DIR, exported.input_names, max_length).encode
        ctx = PassContext(
            workdir=Path(work), input_names=exported.input_names, encode=encode,
            calibration_texts=lambda: calibration_texts, threads=threads, log=reporter.log,
            family=ckpt.family, task=ckpt.task, model_config=ckpt.config, profile=profile,
            torch_model=torch_model, output_names=list(get_task(ckpt.task).outputs), checkpoint=ckpt,
        )
        final, history = _run_passes(profile, exported, ctx, reporter)
        if final.format != backend.MODEL_FORMAT:
            raise UserError(f"profile {profile.name}: its passes end in {final.format}, but {profile.backend} runs {backend.MODEL_FORMAT}")
        model_path = _copy_model(final, staged.staging / MODEL_DIR)

        reference = reference_runner(ckpt, exported.input_names, threads, torch_model=torch_model)
        candidate = backend.make_runner(model_path, profile.runtime, threads)
        gate = plan.gates
        try:
            candidate.activate()
        except Exception as e:  # the backend cannot load what the passes built
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise UserError(f"{profile.backend} could not load the compiled model: {first}") from e
        with reference, candidate:
            with reporter.step(f"validate parity on {len(validation_texts)} texts"):
                reference.set_threads(cpu_count())  # the original's outputs do not depend on it
                checks = parity_checks(reference, candidate, encode, validation_texts, ckpt.task,
                                       profile.validation.padded_length, gate.level)
                invariance = batch_invariance(candidate, encode, validation_texts[:INVARIANCE_TEXTS], ckpt.task)
                reference.set_threads(threads)  # latency is timed at the user's thread count
            decision = judge_checks(checks, gate)
            failures, verdict = decision.failures, profile_status(decision)
            for note in decision.undecided:
                reporter.log(f"gate undecided on these texts, kept as passed: {note} (judge it on your data: --data)")
            if not invariance["invariant"]:
                reporter.log(f"outputs move with the batch: a text alone vs in a mixed batch differs by up to "
                             f"{invariance['max_abs_diff']:.2g} (cosine {invariance['cosine_min']:.6f}); "
                             "declared in the manifest (batch_invariance)")
            runs = profile.latency.runs if latency_runs is None else latency_runs
            latency = None
            if runs > 0:
                with reporter.step(f"latency b{profile.latency.batch}/s{profile.latency.sequence}, {runs} interleaved runs"):
                    feeds = fixed_cell_feeds(encode, validation_texts, profile.latency.batch, profile.latency.sequence)
                    timed = time_interleaved({"pytorch": lambda: reference.infer(feeds), "artifact": lambda: candidate.infer(feeds)},
                                             runs=runs, warmup=profile.latency.warmup)
                    latency = {
                        "batch": profile.latency.batch, "sequence": int(feeds["input_ids"].shape[1]), "threads": threads,
                        "pytorch": timed["pytorch"].to_dict(), "artifact": timed["artifact"].to_dict(),
                        "speedup": speedup(timed["pytorch"], timed["artifact"]),
                    }
            load_seconds = candidate.load_seconds
        passed = not failures
        env = environment()
        manifest = Manifest(**manifest_header(ckpt, passed, max_length), **{
            "pooling": sentence_pooling(ckpt.path) if ckpt.task == "feature-extraction" else None,
            "model": {"path": model_path.relative_to(staged.staging).as_posix(), "format": final.format,
                      "backend": profile.backend, "opset": exported.opset},
            "tokenizer": TOKENIZER_DIR,
            "labels": "labels.json" if ckpt.id2label else None,
            "inputs": [t.to_dict() for t in exported.inputs],
            "outputs": [t.to_dict() for t in exported.outputs],
            "target": {"name": profile.name, "backend": profile.backend, "precision": profile.precision,
                       "description": profile.description, "runtime": profile.runtime,
                       "shapes": {"batch": profile.batch.__dict__, "sequence": profile.sequence.__dict__},
                       "passes": history},
            "calibration": {"source": calib_set.source if calib_set else "builtin:calib", "count": len(calibration_texts),
                            "seed": seed, "skipped": calib_set.skipped if calib_set else {}} if any(get_pass(p.type).needs_calibration() or "target_min_cosine" in p.config
                                                                      or "target_agreement" in p.config for p in profile.passes) else None,
            "parity": {"texts": len(validation_texts), "source": plan.validation_source,
                       "gates": gate.given(), "rule": None if gates else profile.validation.rule,
                       "checks": checks, "passed": passed, "verdict": verdict, "failures": failures,
                       "undecided": decision.undecided, "within_noise": decision.within_noise,
                       "verdicts": [v.to_dict() for v in decision.verdicts]},
            "batch_invariance": invariance,
            "latency": latency,
            "distillation": json.loads((ckpt.path / "distill_report.json").read_text())
            if (ckpt.path / "distill_report.json").is_file() else None,
            "load_seconds": load_seconds,
            "sizes": {"source_weights_bytes": sum(p.stat().st_size for p in ckpt.weight_files),
                      "model_bytes": sum((staged.staging / MODEL_DIR / f.name).stat().st_size for f in final.files)},
            "threads": threads,
            "versions": env["packages"] | backend.versions(),
            "environment": {k: v for k, v in env.items() if k != "packages"},
        }).to_dict()
        rows = summary_rows(manifest)
        (staged.staging / "report.md").write_text(render_report(manifest, rows))
        manifest = write_manifest(staged.staging, manifest)
        artifact = staged.publish(passed)
    result = ConvertResult(artifact, passed, failures, manifest, rows, verdict, decision.undecided)
    if not passed:
        raise GateFailed(failures, result)
    return result

