"""``train_student``: the distillation loop (losses: ``bertexport.students.losses``). Held-out
texts are evaluated every few steps and the best student is kept (or, at a learning rate of 0,
the annealed one unless the best was better beyond noise); with ``patience`` training
stops when held-out agreement stops improving; a checkpoint (model, projections, optimizer,
schedule, RNG, position, evaluations) is written atomically so an interrupted or time-capped
run resumes. See ``train_student``'s docstring."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from bertexport.core.errors import UserError
from bertexport.core.families import layer_count as _layer_count
from bertexport.core.progress import Reporter
from bertexport.students.device import batches_on_device, device_record, training_device
from bertexport.students.distill_config import (DistillConfig, cooldown_steps, hidden_loss_weight, schedule_steps,
                                                uniform_layer_map)
from bertexport.students.losses import _Intermediate, _loss, class_weights
from bertexport.students.step_cost import autocast, training_dropout, training_precision
from bertexport.students.training_data import TeacherOutputs, length_batches, sequence_length, split_eval, training_rows


_RESUME_IGNORES = ("threads", "checkpoint_every", "device")
_EXTENDABLE = ("epochs", "max_epochs")  # what ``extend=True`` may raise: a finished run continued to a later cap


# a loaded config's runtime flags (set by whoever ran the model before, not by its checkpoint)
_RUNTIME_CONFIG_KEYS = ("_name_or_path", "transformers_version", "return_dict", "output_hidden_states", "output_attentions",
                        "torchscript", "use_cache", "dtype", "torch_dtype")


def _inputs_parts(teacher_model, texts, labels, task, cfg: DistillConfig, teacher_id: str | None = None) -> dict:
    """What a run's work folder is valid for, by part: the teacher (``teacher_id``, e.g. its
    checkpoint's digest, else its config without runtime flags or private fields), the data and the
    settings that shape the batches. Stable across processes: a rerun resumes its own checkpoint."""
    from bertexport.core.hashing import cache_key

    keys = ("batch_size", "max_length", "seed", "eval_fraction", "augment", "augment_below")
    teacher = teacher_id or {k: v for k, v in teacher_model.config.to_dict().items()
                             if k not in _RUNTIME_CONFIG_KEYS and not k.startswith("_")}
    return {"teacher": cache_key(teacher), "texts": cache_key(texts), "labels": cache_key(labels), "task": task,
            "settings": cache_key({k: getattr(cfg, k) for k in keys})}


def _inputs_digest(teacher_model, texts, labels, task, cfg: DistillConfig, teacher_id: str | None = None) -> str:
    from bertexport.core.hashing import cache_key

    return cache_key(_inputs_parts(teacher_model, texts, labels, task, cfg, teacher_id))


def _prepare_work(work: Path, digest: str, parts: dict | None = None, restart_stale: bool = False) -> None:
    """``work`` holds one run's caches: refuse to resume another run's checkpoint (naming what
    differs), drop stale caches. ``restart_stale``: a folder keyed by its inputs already (the
    search's cache) holding another stamp was stamped by an older bertexport: start it again."""
    stamp = work / "inputs.json"
    if stamp.is_file() and (before := json.loads(stamp.read_text())).get("digest") != digest:
        if (work / "checkpoint.pt").is_file() and not restart_stale:
            differs = [k for k in (parts or {}) if (before.get("parts") or {}).get(k) != parts[k]]
            raise UserError(f"{work} holds an interrupted run on other {', '.join(differs) or 'data or settings'}; "
                            "start again without resuming (delete that folder)")
        for f in work.iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"digest": digest, "parts": parts or {}}) + "\n")


def _evaluate(model, batches, teacher_outs, task, per_row: bool = False):
    """Held-out figures of ``model`` against the teacher: ``score`` (agreement, or the mean
    cosine of feature extraction), ``accuracy`` where rows have labels. ``per_row``: also each
    held-out text's own score (agreement 0/1, a token task's agreement over its tokens, a cosine),
    in ``batches``' order — what ``kept_state`` pairs two states on."""
    import torch

    model.eval()
    agree = total = correct = labelled = 0
    cosines, rows = [], []
    with torch.inference_mode():
        for b, t in zip(batches, teacher_outs):
            o = model(**b["inputs"])
            mask = b["inputs"]["attention_mask"].bool()
            if task == "feature-extraction":
                m = mask.float()[..., None]
                ps = (o.last_hidden_state * m).sum(1) / m.sum(1)
                pt = (torch.as_tensor(t["hidden"], device=m.device) * m).sum(1) / m.sum(1)
                cosines += torch.nn.functional.cosine_similarity(ps, pt, dim=-1).tolist()
                continue
            if task == "question-answering":
                s, tt = o.start_logits.argmax(-1), torch.as_tensor(t["start"], device=mask.device).argmax(-1)
            else:
                s, tt = o.logits.argmax(-1), torch.as_tensor(t["logits"], device=mask.device).argmax(-1)
            if task in ("question-answering", "text-classification"):
                rows += (s == tt).float().tolist()
            else:  # a token task: its real tokens
                rows += (((s == tt) & mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
                s, tt = s[mask], tt[mask]
            agree += int((s == tt).sum())
            total += int(s.numel())
            if "labels" in b and task == "text-classification":
                correct += int((s == b["labels"]).sum())
                labelled += len(b["labels"])
    model.train()
    out = {}
    if cosines:
        out["cosine_mean"] = float(np.mean(cosines))
        out["score"] = out["cosine_mean"]
    else:
        out["agreement"] = agree / max(total, 1)
        out["score"] = out["agreement"]
    if labelled:
        out["accuracy"] = correct / labelled
    return (out, np.asarray(cosines or rows, dtype=np.float64)) if per_row else out


def kept_state(kept_rows, end_rows, confidence: float = 0.95) -> dict:
    """Which state to keep when training ends at a learning rate of 0 (a cooldown done, or the
    schedule's end) without a strictly better held-out score: the annealed end, unless the
    state kept so far scored better beyond the held-out texts' noise (the 95 % paired interval
    of its advantage above 0). Measured on 4,925 untouched news posts: annealed ends 0.83 points
    [0.44, 1.25] and -0.04 [-0.39, +0.31] against the earlier best-scoring states their
    held-out texts preferred by 2 rows (docs/students.md). Returns ``keep`` ("end" or "best")
    and the paired difference (kept minus end, in the score's unit)."""
    from bertexport.judging.stats import accuracy_drop, mean_of_rows

    if kept_rows is None or len(kept_rows) != len(end_rows) or not len(end_rows):
        return {"keep": "end", "why": "no per-row scores of the earlier state"}
    k, e = np.asarray(kept_rows, np.float64), np.asarray(end_rows, np.float64)
    if np.isin(k, (0.0, 1.0)).all() and np.isin(e, (0.0, 1.0)).all():  # one decision a row: Tango's paired interval
        iv = accuracy_drop(k.astype(bool), e.astype(bool), confidence)
        diff = {"estimate": iv.estimate / 100, "low": iv.low / 100, "high": iv.high / 100}
    else:  # a per-row fraction or cosine: bootstrap over rows
        iv = mean_of_rows(k - e, confidence)
        diff = {"estimate": iv.estimate, "low": iv.low, "high": iv.high}
    diff = {key: round(v, 6) for key, v in diff.items()} | {"rows": int(len(e)), "confidence": confidence}
    return {"keep": "best" if diff["low"] > 0 else "end", "difference": diff}


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def _means(values: list[float]) -> dict:
    k = max(1, len(values) // 10)
    return {"first_10pct": float(np.mean(values[:k])), "last_10pct": float(np.mean(values[-k:])), "steps": len(values)}


def train_student(teacher_model, student_model, tokenizer, texts: list[str], labels: list | None, task: str,
                  cfg: DistillConfig, work: Path, reporter: Reporter | None = None, layer_map: list[int] | None = None,
                  *, on_step: Callable[[int, float], None] | None = None, teacher_cache: Path | None = None,
                  deadline: float | None = None, seconds: float | None = None, extend: bool = False,
                  teacher_id: str | None = None, restart_stale: bool = False):
    """Distil ``teacher_model`` into ``student_model`` (same family and tokenizer) on
    ``texts`` (``labels``: label ids, or None). Returns ``(best student, report)``.

    Losses (each weighted by its ``cfg.alpha_*``; a 0 turns it off):
    - ``kd``: temperature-scaled KL on the teacher's logits (start/end for QA); ``ce``:
      cross-entropy on labels where rows have them; encoders: ``cos`` + ``mse`` on the
      pooled / last hidden states;
    - ``hidden`` (TinyBERT): MSE between the embedding outputs and between each student
      layer's hidden states and its mapped teacher layer's (``layer_map[i]`` = the teacher
      layer of student layer i; default ``uniform_layer_map``); where the widths differ a
      learned ``nn.Linear`` per mapped layer projects the student onto the teacher's width;
      the projections train with the student and are discarded;
    - ``attention`` (MiniLMv2): Q-Q, K-K, V-V scaled dot-product relations of the last
      student layer vs teacher layer ``layer_map[-1]``, split into relation heads that
      divide both widths (any student width), KL summed over the three; Q/K/V are caught
      by forward hooks on the query/key/value Linear modules.
    Which losses: ``hidden`` only with enough data (``hidden_loss_weight``: per-layer losses
    overfit small data, Ko et al. 2023); ``attention`` (the last layer only) always.
    Weights 1.0 when on, as the sources weigh them (TinyBERT sums
    its layer losses unweighted, MiniLMv2 sums Q-Q, K-K and V-V unweighted): both parts are
    scale-free enough for that (a KL between distributions; an MSE of LayerNorm outputs) and
    both are the published objectives that beat logit-only KD for shallow students
    (TinyBERT 89.3-90.7 -> 91.5 on SST-2 with augmentation; attention transfer the
    strongest single objective, arXiv 2305.15032). Not tuned here on real models yet.

    Data: a seeded split holds out ``cfg.eval_fraction`` of ``texts`` (originals only,
    never augmented); when there are fewer than ``cfg.augment_below`` texts,
    ``cfg.augment`` variants of every training text (``bertexport.students.augment``) are added and
    labelled by the teacher (the student learns its soft outputs on them). The teacher's
    logits for every training and held-out row are computed once and cached in ``work``
    (teacher-train.npz, teacher-eval.npz); so are the intermediate outputs this student's losses
    read (the mapped layers' hidden states, the relation layer's Q/K/V: ``teacher_intermediates``,
    float16 arrays beside them), or, when those would not fit, computed on the fly per batch.

    Sequence length: ``sequence_length`` (the data's 99th percentile unless given). Schedule:
    AdamW at ``cfg.lr`` (3e-4: small students like higher rates than BERT fine-tuning's
    2e-5..5e-5, the top of Turc et al.'s BERT-miniature grid; on Reuters R52 a 2-layer student's
    agreement rose 1.2 points over 1e-4 in the same time), linear warmup over
    ``cfg.warmup`` of the schedule (at most one epoch), linear decay to 0 at its end (the
    epoch count, or ``cfg.max_epochs`` with patience).

    When it stops: the held-out texts are evaluated every ``eval_every`` steps (default
    ``EVALS_PER_EPOCH`` a epoch) and the best state is kept in work/best (the step-0
    evaluation is the curve's start, not a candidate). With ``cfg.patience``, after that many
    evaluations without a better score the rate is cooled down linearly to 0 over
    ``cooldown_steps`` (``cfg.cooldown`` of the steps run) and training stops at its end
    (``stopped: plateau``; the report's ``schedule.cooldown``), or at ``cfg.max_epochs``;
    without patience, after ``cfg.epochs``. With patience and a deadline, the cooldown also
    starts when the time left would just fit it (``stopped: time`` at its end; a later call
    resuming the run puts the rate back on the schedule). ``deadline`` (a ``time.monotonic()``
    value) stops it after the step that passes it (evaluated first; ``stopped: time``); so does
    ``seconds`` of training, counted from when the teacher's outputs are ready (computing them
    once is the teacher's cost, shared by every student on the same data, not this run's).
    A run ending at a learning rate of 0 (a cooldown's end, or the schedule's) keeps that
    annealed state unless the state kept before it scored better beyond the held-out texts'
    noise (``kept_state``; the report's ``kept_step`` and ``annealed_choice``): on 1,070 held-out
    texts a 2-row lead of an unannealed state was 0.83 points of task accuracy the wrong way.

    Resumable: ``work/checkpoint.pt`` (model, projections, optimizer, schedule, RNG,
    position, evaluations, plateau count) is written atomically every ``cfg.checkpoint_every``
    steps and after every evaluation; a call finding it continues from the saved step (same
    data and settings, else UserError). Resumed from a checkpoint, the run repeats what an
    uninterrupted one would have done (same order, RNG and evaluations: the same weights
    within float noise); one stopped by ``deadline`` had an extra evaluation at the stop, so
    its plateau count can differ from an uninterrupted run's by that evaluation.

    ``extend``: the checkpoint is of a run that ended at its cap (``epochs`` or ``max_epochs``)
    and ``cfg`` raises that cap (nothing else may differ): training continues from the saved
    step, weights, optimizer and plateau count. The schedule becomes ``cfg``'s (linear decay to 0
    at the new cap): its rate jumps from 0 back to where that line stands at the saved step
    (a warm restart); the best state so far stays the one to beat.

    ``teacher_id`` (e.g. the checkpoint's digest) names the teacher in the work folder's stamp and
    the teacher-output caches; without it, its config (runtime flags left out) does.
    ``restart_stale``: a work folder stamped for other inputs is started again, not refused
    (``_prepare_work``).
    """
    import torch
    from transformers import get_linear_schedule_with_warmup

    reporter = reporter or Reporter()
    work = Path(work)
    student = student_model
    teacher_model.eval()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    device = training_device(cfg.device)
    precision, precision_why = training_precision(cfg.precision, device)
    n_teacher, n_student = _layer_count(teacher_model.config), _layer_count(student.config)
    layer_map = list(layer_map) if layer_map is not None else uniform_layer_map(n_teacher, n_student)
    if len(layer_map) != n_student or any(not 0 <= t < n_teacher for t in layer_map):
        raise UserError(f"layer map {layer_map} must give a teacher layer (0..{n_teacher - 1}) for each of the "
                        f"student's {n_student} layers")
    if cfg.augment < 0 or (cfg.alpha_hidden or 0) < 0 or cfg.alpha_attention < 0:
        raise UserError("augment, alpha_hidden and alpha_attention must be >= 0")

    from bertexport.core.hashing import cache_key

    parts = _inputs_parts(teacher_model, texts, labels, task, cfg, teacher_id)
    digest = cache_key(parts)  # as ``_inputs_digest``: the texts hashed once
    _prepare_work(work, digest, parts, restart_stale)
    train_idx, eval_idx = split_eval(len(texts), cfg)
    data = training_rows(texts, labels, train_idx, eval_idx, cfg)
    if data["augmented"]:
        reporter.log(f"{data['augmented']} variants of {data['originals']} training texts, labelled by the teacher")
    max_length = sequence_length(tokenizer, texts, cfg, teacher_model.config)
    if cfg.batch_size * max_length > cfg.max_tokens_per_batch:
        raise UserError(f"batch_size x max_length = {cfg.batch_size * max_length} tokens per batch risks running out of "
                        f"memory (limit {cfg.max_tokens_per_batch}); lower the batch size or the max length")
    alpha_hidden, hidden_why = hidden_loss_weight(cfg, data["originals"])
    reporter.log(f"max length {max_length} ({'given' if cfg.max_length else f'p{cfg.length_percentile:g} of the data'}); "
                 f"hidden-state loss {alpha_hidden:g} ({hidden_why})")
    train_b = length_batches(tokenizer, data["texts"], data["labels"], cfg.batch_size, max_length, cfg.seed)
    eval_b = length_batches(tokenizer, [texts[i] for i in eval_idx], [labels[i] for i in eval_idx] if labels is not None else None,
                             cfg.batch_size, max_length, cfg.seed)
    teacher_home = next(teacher_model.parameters()).device
    train_b, eval_b = batches_on_device(train_b, device), batches_on_device(eval_b, device)
    teacher_model.to(device)
    student.to(device)
    # ``teacher_cache``: a folder of this teacher's outputs shared by several students (the
    # digest covers the texts, labels, task and batching; the folder must be the teacher's own)
    where = (Path(teacher_cache), f"{digest[:20]}-") if teacher_cache else (work, "")
    where[0].mkdir(parents=True, exist_ok=True)
    outputs = TeacherOutputs(where[0] / f"{where[1]}teacher-train.npz", task)
    inter = _Intermediate(teacher_model, student, layer_map, dataclasses.replace(cfg, alpha_hidden=alpha_hidden))
    try:
        with reporter.step("teacher outputs and intermediate states (one pass, cached)"):
            inter.cache_teacher(train_b, where[0], where[1], reporter.log, outputs=outputs)  # saves the outputs too
            teacher_train = outputs.load_or_compute(teacher_model, train_b, reporter.log)
            teacher_eval = TeacherOutputs(where[0] / f"{where[1]}teacher-eval.npz", task).load_or_compute(
                teacher_model, eval_b, reporter.log)
        row_weights, balance = (class_weights(teacher_train, cfg.class_balance) if task == "text-classification"
                                else (None, None))
        if row_weights is not None:
            names = getattr(teacher_model.config, "id2label", None) or {}
            reporter.log("class balance (loss weight per teacher-predicted class): " + ", ".join(
                f"{names.get(c, c)} {v['rows']} rows x{v['weight']:.2f}" for c, v in balance["classes"].items()))
        steps_per_epoch = len(train_b)
        plan = schedule_steps(cfg, steps_per_epoch)
        total, every = plan["total"], plan["eval_every"]
        opt = torch.optim.AdamW(list(student.parameters()) + inter.parameters(), lr=cfg.lr, weight_decay=0.01)
        sched = get_linear_schedule_with_warmup(opt, plan["warmup"], total)
        state = {"step": 0, "best": -math.inf, "best_step": None, "since_best": 0, "stopped": None, "evals": [],
                 "history": [], "parts": {}, "resumed_from_step": None}
        if (work / "checkpoint.pt").is_file():
            saved = torch.load(work / "checkpoint.pt", weights_only=False, map_location="cpu")
            ignores = _RESUME_IGNORES + (_EXTENDABLE if extend else ())
            now = {k: v for k, v in asdict(cfg).items() if k not in ignores}
            then = {k: v for k, v in saved["config"].items() if k not in ignores}
            if now != then:
                changed = sorted(k for k in now if now[k] != then.get(k))
                raise UserError(f"the interrupted run in {work} used other settings ({', '.join(changed)}); "
                                "resume with the same ones or start again")
            student.load_state_dict(saved["model"])
            if inter.projections is not None:
                inter.projections.load_state_dict(saved["projections"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            torch.set_rng_state(saved["torch_rng"])
            if extend and total <= saved["state"]["step"]:
                raise UserError(f"the run in {work} is at step {saved['state']['step']}: a cap of {total} steps does not extend it")
            state = saved["state"] | {"resumed_from_step": saved["state"]["step"]}
            if state.get("stopped") == "time":  # a time cap is this call's, not the run's: go on
                state["stopped"] = None
            if (state.get("cooldown") or {}).get("why") == "time":  # so is the cooldown before it: the rate
                state.setdefault("earlier_cooldowns", []).append(state.pop("cooldown"))  # back on the schedule
                for group, lr in zip(opt.param_groups, sched.get_last_lr()):
                    group["lr"] = lr
            reporter.log(f"resuming at step {state['step']} of {total}")

        def checkpoint():
            _save_checkpoint(work / "checkpoint.pt", {
                "model": student.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "projections": inter.projections.state_dict() if inter.projections is not None else None,
                "torch_rng": torch.get_rng_state(), "state": state, "config": asdict(cfg)})

        def keep(rows):
            student.save_pretrained(work / "best", safe_serialization=True)
            state["kept_step"], state["kept_rows"] = state["step"], rows.tolist()

        def evaluate():
            """Held-out agreement now; the best state kept in work/best; the plateau counted; at a
            learning rate of 0 (a cooldown's or the schedule's end), the annealed state kept
            unless the one kept so far was better beyond noise (``kept_state``)."""
            metrics, rows = _evaluate(student, eval_b, teacher_eval, task, per_row=True)
            inter.drop_captures()
            state["evals"].append({"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 3), **metrics})
            cooling = state.get("cooldown")
            annealed = state["step"] >= total or bool(cooling and state["step"] >= cooling["from_step"] + cooling["steps"])
            if metrics["score"] > state["best"]:
                state["best"], state["best_step"], state["since_best"] = metrics["score"], state["step"], 0
                keep(rows)
            else:
                state["since_best"] += 1
                if annealed:
                    choice = kept_state(state.get("kept_rows"), rows)
                    state["annealed_choice"] = choice | {"step": state["step"], "kept_step": state.get("kept_step", state["best_step"])}
                    if choice["keep"] == "end":
                        keep(rows)
            recent = state["history"][-every:]
            reporter.log(f"step {state['step']} (epoch {state['step'] / steps_per_epoch:.2f}): loss "
                         f"{np.mean(recent) if recent else float('nan'):.4f}, "
                         + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "score")
                         + (f"; best {state['best']:.4f} at step {state['best_step']}" if state["since_best"] else "; best"))
            if cooling:
                if state["step"] >= cooling["from_step"] + cooling["steps"]:
                    state["stopped"] = cooling["why"]  # the cooldown done: "plateau", or "time" (resumable)
            elif cfg.patience is not None and state["since_best"] >= cfg.patience and not start_cooldown("plateau"):
                state["stopped"] = "plateau"
            if cfg.stop_at_score is not None and not state["since_best"] and metrics["score"] >= cfg.stop_at_score:
                state["stopped"] = "target"  # as good as its caller needs (the state kept: this one)
                reporter.log(f"held-out score {metrics['score']:.4f} reached the target {cfg.stop_at_score:.4f}: stop")

        def start_cooldown(why: str) -> bool:
            """The rate from where it stands linearly to 0 over ``cooldown_steps``, then stop
            (``why``: "plateau", or "time": the deadline is that many steps away). False: no room."""
            steps = cooldown_steps(cfg, state["step"], every, total)
            if steps:
                lr = opt.param_groups[0]["lr"]
                state["cooldown"] = {"from_step": state["step"], "steps": steps, "lr_from": lr, "why": why}
                reporter.log(f"{'held-out plateau' if why == 'plateau' else 'time nearly up'} at step {state['step']}: "
                             f"learning rate {lr:.2g} cooled down to 0 over {steps} steps, then stop")
            return bool(steps)

        def cool_before(now: float) -> None:
            """With patience and a deadline: a cooldown started when what is left of the time
            (x 1.1) would just fit it at this call's pace so far (evaluations included), so a
            student the time stops is judged annealed, not at a high rate."""
            ran = state["step"] - started["step"]
            if deadline is None or cfg.patience is None or state.get("cooldown") or ran < every:
                return
            pace = (now - started["at"]) / ran
            steps = cooldown_steps(cfg, state["step"], every, total)
            if steps and now + 1.1 * steps * pace >= deadline:
                start_cooldown("time")

        def advance_lr():
            """The schedule's next step, or during a cooldown a linear decay to 0 at its end."""
            cooling = state.get("cooldown")
            if not cooling:
                sched.step()
                return
            left = max(0.0, 1.0 - (state["step"] - cooling["from_step"]) / cooling["steps"])
            for group in opt.param_groups:
                group["lr"] = cooling["lr_from"] * left

        if state["step"] == 0 and state.get("initial_eval") is None:
            state["initial_eval"] = _evaluate(student, eval_b, teacher_eval, task)  # the curve's start, not a candidate
            inter.drop_captures()
        student.train()
        t0 = time.perf_counter()
        started = {"step": state["step"], "at": time.monotonic()}  # this call's pace (``cool_before``)
        if seconds is not None:  # this run's training time starts now, after the teacher's outputs
            deadline = min(d for d in (deadline, started["at"] + seconds) if d is not None)
        how = (f"until {cfg.patience} evaluations without a better held-out score, at most {cfg.max_epochs} epochs"
               if cfg.patience is not None else f"{cfg.epochs} epochs")
        reporter.log(f"training precision {precision} ({precision_why}); dropout "
                     + ("as the checkpoint has it" if cfg.dropout is None else f"{cfg.dropout:g} while training"))
        with reporter.step(f"distill {how} ({steps_per_epoch} steps each, evaluated every {every})"), \
                training_dropout(student, cfg.dropout):
            while state["step"] < total and state["stopped"] is None:
                epoch, pos = divmod(state["step"], steps_per_epoch)
                order = list(range(steps_per_epoch))
                random.Random(cfg.seed * 1000 + epoch).shuffle(order)  # same order on resume
                for bi in order[pos:]:
                    b = train_b[bi]
                    with autocast(precision, device):
                        out = student(**b["inputs"], **inter.student_kwargs())
                        parts = _loss(out, teacher_train[bi], b, task, cfg, None if row_weights is None else row_weights[bi])
                        if inter.active:
                            parts |= inter.parts(out, b["inputs"], bi)
                        loss = sum(parts.values())  # every part fp32 (losses.py computes them so)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(list(student.parameters()) + inter.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad()
                    state["step"] += 1
                    advance_lr()
                    state["history"].append(round(float(loss.detach()), 6))
                    for k, v in parts.items():
                        state["parts"].setdefault(k, []).append(round(float(v.detach()), 6))
                    now = time.monotonic()
                    out_of_time = deadline is not None and now >= deadline
                    cool_before(now)
                    cooled = state.get("cooldown") and state["step"] == state["cooldown"]["from_step"] + state["cooldown"]["steps"]
                    due = state["step"] % every == 0 or state["step"] == total or out_of_time or cooled
                    if due:
                        evaluate()
                        if out_of_time and state["stopped"] is None:
                            state["stopped"] = "time"
                    if due or state["step"] % cfg.checkpoint_every == 0:
                        checkpoint()  # after the evaluation: a resumed run repeats none and skips none
                    if on_step:
                        on_step(state["step"], float(loss.detach()))
                    if state["stopped"]:
                        break
        train_seconds = time.perf_counter() - t0
    finally:
        inter.close()
        teacher_model.to(teacher_home)
        student.to("cpu")

    best = type(student).from_pretrained(work / "best").to(device).eval()
    final = _evaluate(best, eval_b, teacher_eval, task)
    best = best.to("cpu").eval()
    h = state["history"]
    report = {
        "task": task,
        "layer_map": layer_map,
        "intermediate": {"alpha_hidden": alpha_hidden, "hidden_rule": hidden_why, "alpha_attention": cfg.alpha_attention,
                         "projection": inter.projections is not None, "relation_heads": inter.heads,
                         "teacher_states": inter.cache_record,
                         "attention_layers": {"student": n_student - 1, "teacher": layer_map[-1]} if inter.attention else None},
        "data": {"texts": len(texts), "labelled": labels is not None, "train_texts": data["originals"],
                 "eval_texts": len(eval_idx), "augmented": data["augmented"],
                 "augment_per_text": cfg.augment if data["augmented"] else 0,
                 "teacher_labelled_rows": data["originals"] + data["augmented"]},
        "class_balance": balance,  # text classification: the teacher-predicted classes' rows and loss weights
        "max_length": max_length, "max_length_source": "given" if cfg.max_length else f"p{cfg.length_percentile:g} of the data",
        "schedule": {"lr": cfg.lr, "warmup_steps": plan["warmup"], "total_steps": total, "decay": "linear to 0",
                     "steps_per_epoch": steps_per_epoch, "eval_every": every, "patience": cfg.patience,
                     # the last cooldown: from_step, steps, lr_from, why ("plateau", or "time": the deadline
                     # near; ``cooldown_steps``); earlier ones, of time-capped calls resumed after them
                     "cooldown": state.get("cooldown"), "earlier_cooldowns": state.get("earlier_cooldowns", [])},
        # why training ended: "plateau" (patience), "max_epochs" (the cap, with patience), "epochs" (the
        # fixed count), "target" (``cfg.stop_at_score`` reached) or "time" (the caller's deadline:
        # resumable, the work folder continues it)
        "stopped": state["stopped"] or ("max_epochs" if cfg.patience is not None else "epochs"),
        # the state kept (work/best): the best-scoring one, or the annealed end (``kept_state``:
        # ``annealed_choice``); ``best_step``: where the held-out score peaked
        "kept_step": state.get("kept_step", state["best_step"]), "best_step": state["best_step"],
        "annealed_choice": state.get("annealed_choice"),
        "epochs_run": round(state["step"] / steps_per_epoch, 3),
        "steps": state["step"], "resumed_from_step": state.get("resumed_from_step"),
        "loss_first_10pct": _means(h)["first_10pct"], "loss_last_10pct": _means(h)["last_10pct"],
        "loss_parts": {k: _means(v) for k, v in state["parts"].items()},
        "initial_eval": state.get("initial_eval"), "evals": state.get("evals", []), "final_eval": final,
        "train_seconds": train_seconds, "device": device_record(device, cfg.device),
        "precision": {"used": precision, "requested": cfg.precision, "why": precision_why}, "dropout": cfg.dropout,
    }
    return best, report
