"""Two models in one `bertexport serve` (issue #25's fairness target): the other model's p99
while one model is loaded, against its p99 alone, for several server variants in one
interleaved run.

Model "second" is probed by one closed-loop client in a process of its own (the clients of
two models are different programs: a probe sharing the load generator's process and GIL
measures the generator, not the server); model "minilm" is loaded by --clients closed-loop
clients (threads of this process). Each variant is a `bertexport serve ART SECOND` process:
  head        the code at a git revision (--baseline-rev, default HEAD), from a worktree
  current     this tree
  current+si  this tree with the interpreter's GIL switch interval set to --switch-ms
Variants take turns (A B C, then C B A, ...), each round measuring "second" alone and loaded.

Usage (alone on the machine):
  flock /tmp/bench.lock .venv/bin/python bench/two_models.py --artifact /tmp/minilm-art \
      --second-artifact /tmp/minilm-fused --variants head,current --seconds 10 --rounds 2
Writes <cache>/bench/serve/two_models.json; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_load import ServerProcess, Target, free_port, measure_beside, probe_width  # noqa: E402
from serve_clients import load_texts, lscpu, summarize, target_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=Path("/tmp/minilm-art"))
    ap.add_argument("--second-artifact", type=Path, default=Path("/tmp/minilm-fused"))
    ap.add_argument("--variants", default="head,current,current+si")
    ap.add_argument("--baseline-rev", default="HEAD")
    ap.add_argument("--switch-ms", type=float, default=1.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--serve-args", default="", help="extra options for every `bertexport serve`")
    args = ap.parse_args(argv)
    from bertexport.core.cache import cache_dir
    from bertexport.core.envinfo import environment

    variants = [v for v in args.variants.split(",") if v]
    texts = load_texts(args.texts)
    second_manifest = json.loads((args.second_artifact / "manifest.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="two-models-"))
    worktree = None
    servers: dict[str, ServerProcess] = {}
    try:
        if "head" in variants:
            worktree = work / "head"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.baseline_rev],
                           check=True, capture_output=True)
        targets = {}
        for v in variants:
            port = free_port()
            launch = "from bertexport.cli import main; main()"
            env = dict(os.environ)
            if v == "head":
                env["PYTHONPATH"] = str(worktree)
                launch = ("import bertexport, sys; assert bertexport.__file__.startswith(sys.argv.pop(1)), bertexport.__file__; "
                          + launch)
            if v.endswith("+si"):
                launch = f"import sys; sys.setswitchinterval({args.switch_ms / 1000!r}); " + launch
            argv_ = [sys.executable, "-c", launch] + ([str(worktree)] if v == "head" else []) + [
                "serve", str(args.artifact), str(args.second_artifact), "--model-name", "minilm", "--model-name", "second",
                "--port", str(port), *args.serve_args.split()]
            servers[v] = ServerProcess(v, argv_, port, work / f"{v}.log", env=env,
                                       cwd=worktree if v == "head" else work).wait_ready()
            targets[v] = (Target(port, "/v1/embeddings", "minilm"), target_of(second_manifest, port, "second"))
            print(f"ready: {v} on {port}", flush=True)
        a0, b0 = targets[variants[0]]
        widths = {"minilm": probe_width(a0, texts[0]), "second": probe_width(b0, texts[0])}
        cells = {v: {"solo": [], "loaded": [], "a": [], "load_avg": []} for v in variants}
        for r in range(args.rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                a, b = targets[v]
                for mode in (("solo", "loaded") if r % 2 == 0 else ("loaded", "solo")):
                    cells[v]["load_avg"].append(os.getloadavg()[0])
                    rb, ra = measure_beside(a, b, widths, texts, args.seconds, args.warmup, args.clients if mode == "loaded" else 0)
                    cells[v][mode].append(rb)
                    if ra:
                        cells[v]["a"].append(ra)
        rows = []
        for v in variants:
            s, l, la = (summarize(cells[v]["solo"], 1), summarize(cells[v]["loaded"], 1),
                        summarize(cells[v]["a"], args.clients))
            rows.append({"variant": v, "b_solo": s, "b_loaded": l, "a_loaded": la, "p99_ratio": l["p99_ms"] / s["p99_ms"],
                         "p50_ratio": l["p50_ms"] / s["p50_ms"], "load_avg_1m": cells[v]["load_avg"]})
        record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                  "baseline_rev": subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.baseline_rev],
                                                 capture_output=True, text=True).stdout.strip(),
                  "switch_ms": args.switch_ms, "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
                  "serve_args": args.serve_args, "lscpu": lscpu(), "environment": environment(), "rows": rows}
        out = cache_dir("bench", "serve") / "two_models.json"
        out.write_text(json.dumps(record, indent=2))
        print(f"\n| variant | 'second' alone p50 · p99 ms | while 'minilm' has {args.clients} clients p50 · p99 ms "
              f"| p99 ratio | 'minilm' req/s |\n|---|---|---|---|---|")
        for row in rows:
            s, l = row["b_solo"], row["b_loaded"]
            print(f"| {row['variant']} | {s['p50_ms']:.1f} · {s['p99_ms']:.1f} | {l['p50_ms']:.1f} · {l['p99_ms']:.1f} | "
                  f"**{row['p99_ratio']:.2f}x** | {row['a_loaded']['rps']:.1f} |")
        print(f"\n{out}")
    finally:
        for s in servers.values():
            s.stop()
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
