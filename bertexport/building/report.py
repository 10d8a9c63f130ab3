"""Human-readable summaries of an artifact: the one-screen table the CLI prints and the
``report.md`` kept inside the artifact, both rendered from the manifest alone; and the
pieces every report shares: what to call an artifact (``artifact_label``: profile or
recipe, precision, student shape, never its folder name) and how a measured figure is
written with its interval (``with_interval``)."""

from __future__ import annotations

import json
from pathlib import Path



# -- figures with their intervals ---------------------------------------------------------------

# figures whose interval may be recorded under another name (embeddings: agreement is retrieval agreement)
_STATS_NAMES = {"agreement": ("agreement", "retrieval_agreement")}


def interval_of(metrics: dict | None, key: str) -> dict | None:
    """The paired interval record of ``metrics[key]`` (``metrics["stats"][key]``, see
    ``bertexport.judging.stats``), or None when the figures carry none."""
    recorded = (metrics or {}).get("stats") or {}
    for name in _STATS_NAMES.get(key, (key,)):
        st = recorded.get(name)
        if isinstance(st, dict) and st.get("low") is not None and st.get("high") is not None:
            return st
    return None


def with_interval(metrics: dict | None, key: str, spec: str = ".4f", scale: float = 1.0, none: str = "-") -> str:
    """``estimate [low, high]`` when ``metrics`` carries the interval of ``key``, else the
    point estimate alone (``none`` when there is no figure at all)."""
    v = (metrics or {}).get(key)
    st = interval_of(metrics, key)
    if v is None and st is None:
        return none
    est = st["estimate"] if st is not None and st.get("estimate") is not None else v
    text = format(est * scale, spec)
    if st is not None:
        text += f" [{format(st['low'] * scale, spec)}, {format(st['high'] * scale, spec)}]"
    return text


def interval_level(*metrics: dict | None) -> str:
    """"95 %" (or the level the figures carry) for a column header."""
    for m in metrics:
        for st in ((m or {}).get("stats") or {}).values():
            if isinstance(st, dict) and st.get("confidence"):
                return f"{st['confidence'] * 100:g} %"
    return "95 %"


def interval_note(metrics: dict | None, key: str, unit: str = "", scale: float = 1.0) -> str:
    """What the interval of ``key`` rests on: rows, discordant rows, one row's weight, method."""
    st = interval_of(metrics, key)
    if st is None:
        return ""
    parts = [f"{st['confidence'] * 100:g} % interval" if st.get("confidence") else "interval"]
    if st.get("rows") is not None:
        parts.append(f"{st['rows']} rows")
    if st.get("discordant") is not None:
        parts.append(f"{st['discordant']} discordant")
    if st.get("resolution") is not None:
        parts.append(f"1 row = {st['resolution'] * scale:.3g}{unit}")
    if st.get("method"):
        parts.append(str(st["method"]))
    return ", ".join(parts)


# -- what to call an artifact -----------------------------------------------------------------------

def read_json(folder: str | Path | None, name: str = "config.json") -> dict:
    """A JSON object of an artifact's (or checkpoint's) folder, e.g. its ``config.json``;
    {} when absent or unreadable."""
    if folder is None:
        return {}
    try:
        data = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_shape(config: dict, family: str | None = None, layers: int | None = None) -> str:
    """``L{depth}-H{hidden}-A{heads}-F{ffn}`` (the L/H/A naming of Google's BERT releases,
    plus the feed-forward width) from a config, with whatever part the config records;
    ``layers`` fills the depth when the config lacks it."""
    from bertexport.core.families import FAMILIES

    fam = FAMILIES.get(family or config.get("model_type", ""), FAMILIES["bert"])  # an unknown one: BERT's keys

    def first(keys):
        return next((config[k] for k in keys if isinstance(config.get(k), int)), None)

    parts = [("L", first(fam.layers_key) or layers), ("H", first(fam.hidden_key)), ("A", first(fam.heads_key)),
             ("F", first(fam.ffn_key))]
    return "-".join(f"{p}{v}" for p, v in parts if v)


def student_shape(manifest: dict, folder: str | Path | None = None) -> str | None:
    """The shape of a distilled student artifact (None when the artifact is not a student):
    from the artifact's config.json, completed from the student checkpoint's config when
    that is still on disk, and the depth from the distillation record."""
    dist = manifest.get("distillation")
    if not dist:
        return None
    config = read_json((manifest.get("source") or {}).get("path")) | read_json(folder)
    layers = (dist.get("student") or {}).get("layers")
    return model_shape(config, manifest.get("family"), layers) or (f"L{layers}" if layers else "student")


def _precision_words(name: str, precision: str | None) -> str:
    """The precision, unless the name already says it (``ort-int8`` is int8)."""
    if not precision or precision == "-" or precision in name:
        return ""
    return precision


def describe_build(name: str, precision: str | None = None, shape: str | None = None, rejected: bool = False) -> str:
    """One label from what a build is: ``ort-int8``, ``ort-fused fp32``,
    ``ov-int8-bf16 student L3-H384-A12-F1536``, ``ort-int8 (rejected)``."""
    words = [name, _precision_words(name, precision)]
    if shape:
        words.append(f"student {shape}")
    label = " ".join(w for w in words if w)
    return label + (" (rejected)" if rejected else "")


def artifact_label(manifest: dict, folder: str | Path | None = None) -> str:
    """What an artifact is, from its manifest (and config.json): profile or optimize recipe,
    precision, student shape, and whether its gate rejected it. Never its folder name."""
    target = manifest.get("target") or {}
    name = str(target.get("name") or "?")
    shape = student_shape(manifest, folder)
    if shape and "/" in name and name.split("/", 1)[0].startswith("student"):
        name = name.split("/", 1)[1]  # optimize's "student3/ov-int8-bf16": the shape says it better
    return describe_build(name, target.get("precision"), shape, manifest.get("status") == "rejected")


def unique_labels(labels: list[str], folders: list[str | Path | None]) -> list[str]:
    """``labels`` made distinct: a label that several candidates share gets the shortest
    tail of each one's folder path that tells them apart, then ``#2``, ``#3``."""
    out = list(labels)
    for label in set(labels):
        idx = [i for i, x in enumerate(labels) if x == label]
        if len(idx) < 2:
            continue
        paths = [Path(folders[i]).expanduser().resolve().parts if folders[i] else () for i in idx]
        depth = 1
        longest = max(len(p) for p in paths)
        while depth < longest and len({p[-depth:] for p in paths}) < len(paths):
            depth += 1
        for i, p in zip(idx, paths):
            if p:
                out[i] = f"{label} [{'/'.join(p[-depth:])}]"
    seen: dict[str, int] = {}
    for i, x in enumerate(out):
        seen[x] = seen.get(x, 0) + 1
        if seen[x] > 1:
            out[i] = f"{x} #{seen[x]}"
    return out


# -- the artifact's own report ----------------------------------------------------------------------


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
            text += f" · {'retrieval' if c.get('retrieval') else 'decisions'} {with_interval(c, 'agreement', '.1f', scale=100)} %"
        rows.append({"metric": f"parity {name} ({c['samples']} seq)", "original": "reference", "artifact": text})
    inv = manifest.get("batch_invariance")
    if inv:
        verdict = ("bit-identical" if inv.get("bitwise") else "invariant") if inv.get("invariant") else "moves with its batch"
        rows.append({"metric": f"batch invariance ({inv.get('texts')} texts alone vs in a mixed batch)", "original": "-",
                     "artifact": f"{verdict}: max abs diff {inv['max_abs_diff']:.2e} · cos min {inv['cosine_min']:.6f}"
                                 + (f" (tolerance {inv['tolerance']})" if inv.get("tolerance") is not None else "")})
    return rows


def render_report(manifest: dict, rows: list[dict]) -> str:
    tgt = manifest["target"]
    p = manifest["parity"]
    lines = [
        f"# bertexport artifact: {manifest['source']['source']} → {tgt['name']}",
        "",
        f"- status: **{manifest['status'].upper()}**" + ("" if p["passed"] else f" — {'; '.join(p['failures'])}")
        + (f" (gate undecided on these texts: {'; '.join(p.get('undecided') or [])})" if p.get("verdict") == "undecided" else ""),
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
