"""infinity-emb (michaelfeil/infinity) as a peer of `bertexport serve` in bench/serve_clients.py:
its model folders and its server process, set up the way its ONNX engine serves all-MiniLM-L6-v2
correctly on CPU.

infinity runs in a virtualenv of its own (its pins differ from the project's), made once:
  python3.11 -m venv /work/bench-venvs/infinity
  echo "torch==2.13.0" > /tmp/c.txt      # the CPU build on this machine; any other torch pulls a CUDA build
  /work/bench-venvs/infinity/bin/pip install -c /tmp/c.txt "infinity-emb[server,optimum,torch]==0.0.78"
(0.0.78 resolves optimum 2.1.0 + optimum-onnx 0.1.0, onnxruntime 1.32.0, transformers 4.57.6,
torch 2.13.0+cpu, sentence-transformers 3.4.1 via the torch extra; `pip check` clean.)

What had to be fixed for its ONNX ("optimum") engine to serve the real model correctly, offline:
1. The model package ships safetensors only; the engine needs an ONNX file in the model
   folder whose output is `last_hidden_state`. Exported here with optimum-cli, `--library-name
   transformers` (with sentence-transformers installed optimum exports the sentence-transformers
   graph, outputs `token_embeddings`/`sentence_embedding`, and the engine fails: KeyError).
2. Pooling: `--pooling-method auto` (the default) means CLS for the ONNX engine — the vector of
   the first token, not the model's mean pooling (the filer measured cosine 0.48-0.58 to the
   model's embeddings). Served with `--pooling-method mean`.
3. A local model folder: the engine passes the ONNX file's absolute path as optimum's
   `file_name`, which optimum-onnx 0.1.0 refuses ("Could not find any ONNX files with target file
   name /abs/path"). Served with `--model-id .` from inside the folder (relative names).
4. Its own graph optimisation fails with optimum 2.x (`OptimizationConfig` lost
   `optimize_with_onnxruntime_only`) and silently falls back to the unoptimised graph: the graph is
   optimised here (optimum-cli `-O2`) and the engine's attempt is switched off
   (`--onnx-disable-optimize`).
5. int8: on CPU the engine prefers a file named `*quantize*`; optimum's default dynamic int8
   (per-tensor) gives cosine min 0.91 to the PyTorch original on Rotten Tomatoes snippets; per-channel
   (`--per_channel`) gives 0.985. Quantized per channel for this CPU (AVX-512 VNNI, else AVX2), then
   optimised `-O2` (quantizing an `-O2` graph fails: its fused ops have no shape inference).
Threads: the engine builds its ONNX Runtime session with the runtime's default thread count; the
launcher below pins intra-op threads by setting them on every `InferenceSession` it creates.
Telemetry off (`DO_NOT_TRACK=1`), no hub (`HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

DEFAULT_VENV = Path("/work/bench-venvs/infinity")
VARIANTS = ("int8", "fp32")

PINNED = "bench: pinned an ONNX Runtime session:"
# Runs in infinity's venv: pins ONNX Runtime's intra-op threads (and says so in its log), then
# infinity's own CLI.
LAUNCHER = r'''
import sys
import onnxruntime as ort

threads = int(sys.argv[1])
PINNED = sys.argv[2]
_init = ort.InferenceSession.__init__

def _pinned(self, path_or_bytes, sess_options=None, *args, **kwargs):
    so = sess_options if sess_options is not None else ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    _init(self, path_or_bytes, so, *args, **kwargs)
    print(f"{PINNED} intra_op_num_threads={threads}", file=sys.stderr, flush=True)

ort.InferenceSession.__init__ = _pinned
from infinity_emb.cli import cli
sys.argv = ["infinity_emb", *sys.argv[3:]]
cli()
'''


def offline_env(hf_home: Path, threads: int) -> dict:
    return os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(hf_home), "DO_NOT_TRACK": "1",
                         "INFINITY_ANONYMOUS_USAGE_STATS": "0", "OMP_NUM_THREADS": str(threads),
                         "TOKENIZERS_PARALLELISM": "false"}


def cpu_int8_preset() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return "avx512_vnni" if "avx512_vnni" in flags else "avx2"


def prepare_models(venv: Path, original: Path, root: Path, log) -> dict[str, Path]:
    """The infinity model folders (one ONNX file each: int8 and fp32), made once under ``root``
    with the venv's optimum-cli; returns {variant: folder}."""
    cli = venv / "bin" / "optimum-cli"
    if not cli.is_file():
        raise SystemExit(f"no infinity venv at {venv}: see bench/infinity_peer.py's docstring")
    preset = cpu_int8_preset()
    folders = {"int8": root / f"int8-{preset}-per-channel-O2", "fp32": root / "fp32-O2"}
    if all((f / "prepared.json").is_file() for f in folders.values()):
        return folders
    env = offline_env(root / "hf", 1)
    export, quantized = root / "export", root / f"int8-{preset}-per-channel"
    steps = [
        (export, [str(cli), "export", "onnx", "--model", str(original), "--task", "feature-extraction",
                 "--library-name", "transformers", str(export)]),
        (folders["fp32"], [str(cli), "onnxruntime", "optimize", "--onnx_model", str(export), "-O2", "-o", str(folders["fp32"])]),
        (quantized, [str(cli), "onnxruntime", "quantize", "--onnx_model", str(export), f"--{preset}", "--per_channel",
                     "-o", str(quantized)]),
        (folders["int8"], [str(cli), "onnxruntime", "optimize", "--onnx_model", str(quantized), "-O2", "-o",
                           str(folders["int8"])]),
    ]
    root.mkdir(parents=True, exist_ok=True)
    for out, argv in steps:
        log(f"infinity model: {' '.join(argv[1:])}")
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not list(out.glob("*.onnx")):
            raise SystemExit(f"{' '.join(argv)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    for variant, folder in folders.items():
        (onnx,) = folder.glob("*.onnx")
        digest = hashlib.sha256(onnx.read_bytes()).hexdigest()
        (folder / "prepared.json").write_text(json.dumps({"variant": variant, "onnx": onnx.name, "sha256": digest,
                                                          "int8_preset": preset, "steps": [a for _, a in steps]}, indent=2))
    return folders


def server_argv(venv: Path, port: int, threads: int, name: str = "minilm", batch_size: int | None = None) -> list[str]:
    """The command serving the folder it runs in (cwd) as ``name`` on 127.0.0.1:port."""
    argv = [str(venv / "bin" / "python"), "-c", LAUNCHER, str(threads), PINNED, "v2", "--model-id", ".", "--served-model-name", name,
            "--engine", "optimum", "--device", "cpu", "--pooling-method", "mean", "--onnx-disable-optimize",
            "--host", "127.0.0.1", "--port", str(port)]
    return argv + (["--batch-size", str(batch_size)] if batch_size else [])


def versions(venv: Path) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('infinity-emb', 'onnxruntime', 'optimum', 'optimum-onnx', 'transformers', 'torch', 'fastapi', 'uvicorn')}))")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-500:]}
