"""What ``distill`` writes to ``distill_report.json``: teacher and student sizes, the training
record, the held-out figures and an interleaved teacher/student latency."""
from __future__ import annotations

from dataclasses import asdict

from bertexport.core.families import layer_count as _layer_count


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def latency_feeds(eval_b, texts, max_length):
    """One sequence of ``max_length`` real tokens (texts joined): a fixed, comparable cell
    (b1 at the length training used: the data's, ``sequence_length``) instead of whatever
    the first eval batch happens to be."""
    import torch

    ids = eval_b[0]["inputs"]
    tok_ids = torch.cat([b["inputs"]["input_ids"][0] for b in eval_b])[:max_length].unsqueeze(0)
    out = {"input_ids": tok_ids, "attention_mask": torch.ones_like(tok_ids)}
    if "token_type_ids" in ids:
        out["token_type_ids"] = torch.zeros_like(tok_ids)
    return out


def distill_report(ckpt, teacher, student, keep, teacher_layers, trained: dict, eval_b, teacher_eval, cfg, ts, shape_info) -> dict:
    import torch

    from bertexport.judging.latency import speedup, time_interleaved

    teacher_eval_metrics = {}
    if ckpt.task == "text-classification" and any("labels" in b for b in eval_b):
        correct = sum(int((torch.from_numpy(t["logits"]).argmax(-1) == b["labels"]).sum()) for b, t in zip(eval_b, teacher_eval))
        teacher_eval_metrics["accuracy"] = correct / sum(len(b["labels"]) for b in eval_b)
    feeds = latency_feeds(eval_b, ts.texts, trained["max_length"])
    with torch.inference_mode():
        timed = time_interleaved({"teacher": lambda: teacher(**feeds), "student": lambda: student(**feeds)}, runs=20, warmup=3)
    student_info = {"layers": _layer_count(student.config), "kept_teacher_layers": keep, "parameters": _params(student),
                    "bytes_fp32": _params(student) * 4}
    if shape_info:
        student_info |= shape_info
    return {
        "teacher": {"source": ckpt.source, "sha256": ckpt.sha256, "layers": teacher_layers, "parameters": _params(teacher),
                    "bytes_fp32": _params(teacher) * 4, **teacher_eval_metrics},
        "student": student_info,
        "config": asdict(cfg),
        **trained,
        "data": {"source": ts.source, **trained["data"]},
        "latency": {"threads": cfg.threads, "batch": int(feeds["input_ids"].shape[0]), "sequence": int(feeds["input_ids"].shape[1]),
                    "teacher_p50_ms": timed["teacher"].p50 * 1e3, "student_p50_ms": timed["student"].p50 * 1e3,
                    "speedup": speedup(timed["teacher"], timed["student"])},
    }


def kept_note(report: dict) -> str:
    """Why the state kept is that one, when the rule for an annealed end (``training.kept_state``)
    chose it; "" otherwise."""
    choice = report.get("annealed_choice") or {}
    diff = choice.get("difference") or {}
    if choice.get("keep") == "end" and report.get("kept_step") != report.get("best_step"):
        better = (f"{diff['estimate']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}] on {diff['rows']:,} rows, within noise"
                  if diff else choice.get("why", ""))
        return f", the annealed end (the held-out score peaked at step {report.get('best_step')}: {better})"
    if choice.get("keep") == "best":
        return (f", the best-scoring state (the annealed end, step {choice.get('step')}, scored {diff['estimate']:.4f} "
                f"[{diff['low']:.4f}, {diff['high']:.4f}] less on {diff['rows']:,} rows: beyond noise)")
    return ""
