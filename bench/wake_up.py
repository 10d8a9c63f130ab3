"""Where the per-call cost after a pause comes from, and what OpenVINO's CPU settings do to it
(issue #24's b1 ratios on a 2-vCPU AMX Xeon moved ~1 ms between back-to-back and round-robin).

Two OpenVINO models, e.g. an `optimize` winner and the NNCF anchor, at one batch x sequence
cell. For each setting (OpenVINO CPU properties added to each model's own runtime settings)
each model is timed in four conditions, median of --calls calls:
  back-to-back     call after call
  asleep           after --pause-ms of time.sleep (the runtime's worker threads may sleep)
  busy             after --pause-ms of a busy loop on the calling thread (its core stays awake)
  after-other      right after the other model's call
and the second model's time over the first's ("x") per condition.

Usage (alone on the machine):
  flock /tmp/bench.lock .venv/bin/python bench/wake_up.py --first ART_OR_XML --second ANCHOR_XML
Writes <cache>/bench/wake_up.json; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {
    "defaults": {},
    "pinning off": {"ENABLE_CPU_PINNING": "NO"},
    "TBB partitioner auto": {"TBB_PARTITIONER": "AUTO"},
    "1 thread": {"INFERENCE_NUM_THREADS": "1"},
    "1 thread, first only": {"INFERENCE_NUM_THREADS": "1"},
}
FIRST_ONLY = {"1 thread, first only"}  # the second model keeps its defaults (e.g. the anchor at --threads)
CONDITIONS = ("back-to-back", "asleep", "busy", "after-other")


def model_and_runtime(path: Path) -> tuple[Path, dict]:
    """An artifact folder (its model and manifest runtime settings) or a bare OpenVINO IR."""
    if path.is_dir():
        manifest = json.loads((path / "manifest.json").read_text())
        return path / manifest["model"]["path"], manifest.get("target", {}).get("runtime", {})
    return path, {}


def compile_call(core, xml: Path, runtime: dict, threads: int, extra: dict, feeds: dict):
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads)}
    if "inference_precision" in runtime:
        config["INFERENCE_PRECISION_HINT"] = runtime["inference_precision"]
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", config | extra)
    request = compiled.create_infer_request()
    mine = {k: v for k, v in feeds.items() if k in {i.get_any_name() for i in compiled.inputs}}
    return lambda: request.infer(mine)


def medians(call, other, calls: int, pause: float) -> dict[str, float]:
    def busy():
        end = time.perf_counter() + pause
        while time.perf_counter() < end:
            pass

    before = {"back-to-back": lambda: None, "asleep": lambda: time.sleep(pause), "busy": busy, "after-other": other}
    for _ in range(20):
        call(), other()
    out = {}
    for condition in CONDITIONS:
        values = []
        for _ in range(calls):
            before[condition]()
            t0 = time.perf_counter()
            call()
            values.append(time.perf_counter() - t0)
        out[condition] = statistics.median(values) * 1e3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", type=Path, required=True, help="artifact folder or OpenVINO IR (.xml)")
    ap.add_argument("--second", type=Path, required=True, help="artifact folder or OpenVINO IR (.xml), e.g. the anchor")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--pause-ms", type=float, default=5.0)
    args = ap.parse_args()
    import numpy as np
    import openvino as ov

    from bertexport.core.cache import cache_dir

    ids = np.random.default_rng(0).integers(1000, 20000, size=(args.batch, args.seq)).astype(np.int64)
    ids[:, 0] = 101
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    core = ov.Core()
    (x1, r1), (x2, r2) = model_and_runtime(args.first), model_and_runtime(args.second)
    results = {"first": str(args.first), "second": str(args.second), "batch": args.batch, "seq": args.seq,
               "threads": args.threads, "calls": args.calls, "pause_ms": args.pause_ms, "openvino": ov.__version__,
               "settings": {}}
    lines = ["| setting | " + " | ".join(CONDITIONS) + " |", "|---" * (len(CONDITIONS) + 1) + "|"]
    for name, extra in SETTINGS.items():
        a = compile_call(core, x1, r1, args.threads, extra, feeds)
        b = compile_call(core, x2, r2, args.threads, {} if name in FIRST_ONLY else extra, feeds)
        ma, mb = medians(a, b, args.calls, args.pause_ms / 1e3), medians(b, a, args.calls, args.pause_ms / 1e3)
        results["settings"][name] = {"properties": extra, "first_ms": ma, "second_ms": mb}
        lines.append(f"| {name} | " + " | ".join(f"{ma[c]:.2f} / {mb[c]:.2f} ({mb[c] / ma[c]:.2f}x)" for c in CONDITIONS) + " |")
        print(lines[-1], flush=True)
    out = cache_dir("bench") / "wake_up.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    print(f"\nms first / second (second over first); {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
