"""Human-readable summaries of an artifact: the one-screen table the CLI prints and the
``report.md`` kept inside the artifact. Both are rendered from the manifest alone."""

from __future__ import annotations


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f} ms"


def summary_rows(manifest: dict) -> list[dict]:
    """Rows of (metric, original, artifact) for the summary table."""
    rows = [{"metric": "size", "original": _mb(manifest["sizes"]["source_weights_bytes"]),
             "artifact": _mb(manifest["sizes"]["model_bytes"])}]
    lat = manifest.get("latency")
    if lat:
        cell = f"b{lat['batch']}/s{lat['sequence']}, {lat['threads']} thread(s)"
        for q in ("p50", "p90", "p99"):
            rows.append({"metric": f"latency {q} ({cell})", "original": _ms(lat["pytorch"][q]), "artifact": _ms(lat["artifact"][q])})
        sp = lat["speedup"]
        rows.append({"metric": "speedup (p50 ratio; p10-p90 of rounds)", "original": "1.00x",
                     "artifact": f"{sp['p50_ratio']:.2f}x ({sp['round_ratio_p10']:.2f}-{sp['round_ratio_p90']:.2f})"})
    for step in manifest["target"].get("passes", []):
        notes = step.get("notes") or {}
        if "kept_fp32" in notes:
            rows.append({"metric": f"{step['type']}: kept in float", "original": "-",
                         "artifact": f"{notes['kept_fp32']} weight MatMul(s) (scan target {notes.get('target_min_cosine')}, "
                                     f"achieved {notes.get('achieved_min_cosine', 0):.4f}; gate min_cosine "
                                     f"{manifest['parity']['gates'].get('min_cosine')})"})
    for name, c in manifest["parity"]["checks"].items():
        text = f"cos min {c['cosine_min']:.5f} · max abs diff {c['max_abs_diff']:.2e}"
        if c.get("agreement") is not None:
            text += f" · top-1 {c['agreement'] * 100:.1f}%"
        rows.append({"metric": f"parity {name} ({c['samples']} seq)", "original": "reference", "artifact": text})
    return rows


def render_report(manifest: dict, rows: list[dict]) -> str:
    tgt = manifest["target"]
    p = manifest["parity"]
    lines = [
        f"# bertexport artifact: {manifest['source']['source']} → {tgt['name']}",
        "",
        f"- status: **{manifest['status'].upper()}**" + ("" if p["passed"] else f" — {'; '.join(p['failures'])}"),
        f"- family / task: {manifest['family']} / {manifest['task']} (max length {manifest['max_length']})",
        f"- backend: {tgt['backend']} ({tgt['precision']}); passes: {', '.join(x['type'] for x in tgt['passes']) or 'none'}",
        f"- checkpoint sha256: `{manifest['source']['sha256']}`",
        f"- parity gates: {', '.join(f'{k}={v}' for k, v in p['gates'].items())}",
        f"- threads pinned: {manifest['threads']}; CPU: {manifest['environment']['cpu'].get('model', '?')}",
        "",
        "| metric | PyTorch original | artifact |",
        "|---|---|---|",
    ]
    lines += [f"| {r['metric']} | {r['original']} | {r['artifact']} |" for r in rows]
    whys = [f"- {x['type']}: {x['notes']['why']}" for x in tgt["passes"] if (x.get("notes") or {}).get("why")]
    if whys:
        lines += ["", "Mixed precision:"] + whys
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()), ""]
    lines.append("Latency was measured on the build machine, interleaved with the PyTorch original in one run; "
                 "compare the ratio, not the absolute figures, across machines.")
    return "\n".join(lines) + "\n"
