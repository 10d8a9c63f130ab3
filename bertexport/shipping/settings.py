"""The settings records of the shipping commands (``run``, ``serve``, ``verify``, ``sign``,
``pack``, ``unpack``, ``inspect``, ``cache``): one typed record per command, its fields the
command's options (``bertexport.cli.settings`` makes the Click options from them). Light on
purpose: the CLI imports it to build its options (no runtime, no HTTP stack here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bertexport.core.errors import UserError
from bertexport.core.options import option
from bertexport.core.shared_settings import threads_field, trusted_key_field

# Windows per inference call of `serve`. Coalesced windows are sorted by length and cut into
# batches of this many: on CPU, short sorted batches win (less padding); measured on MiniLM
# ort-int8 with Rotten Tomatoes snippets on a shared 2-core EPYC, CPU time per text: alone
# 11.9 ms, 32 coalesced in batches of 8 9.9 ms, in one batch of 32 17.5 ms.
SERVE_BATCH_SIZE = 8
API_KEY_ENV = "BERTEXPORT_API_KEY"  # serve's API key (shipping.api_keys reads it)
BULK_ONLY = "bulk mode (--out/--ray) takes --file and --out only (no TEXTS, --context or --json)"


def ray_address_field(help: str):
    """``--ray [ADDRESS]``: a Ray cluster's address, or ``local`` when given without one."""
    return option(None, help, flag="--ray", flag_value="local", metavar="[ADDRESS]")


def exit_threshold_field():
    """``--exit-threshold``: an early-exit artifact's threshold instead of its manifest's."""
    return option(None, "An early-exit artifact: a row leaves at the first exit whose highest class probability is above "
                        "this, instead of the manifest's threshold (1.0: no row exits; 0.0: every row at the first exit). "
                        "Refused for any other artifact.", min=0.0, max=1.0)


@dataclass(kw_only=True)
class RunSettings:
    """``bertexport run``: texts through an artifact without torch, printed, or a whole file in bulk."""

    artifact: Path = option(help="The artifact folder to run.", argument=True)
    texts: list[str] = option(help="Texts to run (or --file).", argument=True, default_factory=list)
    file_: Path | None = option(
        None, "Read texts from a file (streamed): .txt one per line, or the text column of a .csv/.tsv/.jsonl/.json/"
              ".parquet — the same texts with and without --out.", flag="--file")
    text_column: str | None = option(
        None, "With --file: the column (or JSON field) holding the texts (default: text, sentence, review or content, "
              "the first present).")
    context: str | None = option(None, "Question-answering: the context; TEXTS are the questions.")
    top_k: int = option(1, "Labels (or tokens) to return per text (or mask).", min=1)
    stride: int | None = option(
        None, "Tokens shared by consecutive windows of a long text (default: max_length/4).", min=0)
    max_length: int | None = option(None, "Window length in tokens (default and maximum: the model's).", min=8)
    aggregation: str = option("mean", "Classification of long texts: mean of window logits, or the most confident "
                                      "window.", choices=("mean", "max"))
    normalize: bool | None = option(None, "Embeddings: L2-normalise (default: as the source model).",
                                    flag="--normalize/--no-normalize")
    batch_size: int = option(
        16, "Windows per inference call (bulk mode: part of the output's identity, as int8 results depend on batches).",
        min=1)
    threads: int | None = threads_field(None, "Runtime threads (default: the runtime's own).")
    trusted_key: Path | None = trusted_key_field()
    out_file: Path | None = option(
        None, "Bulk mode: write one row per input text of --file (.txt/.jsonl/.csv/.tsv/.parquet) to this .jsonl or "
              ".parquet (byte-identical however it runs; provenance in .OUT.bulk.json beside it).", flag=("--out", "-o"))
    resume: bool = option(False, "Bulk mode: continue an interrupted run of the same artifact, input and options.")
    force: bool = option(False, "Bulk mode: replace an --out that bertexport wrote (never a file of your own).")
    ray_address: str | None = ray_address_field(
        "Bulk mode on a Ray cluster through Ray Data (ADDRESS of a running cluster, or a local one).")
    workers: int = option(2, "With --ray: Predictor actors.", min=1)
    exit_threshold: float | None = exit_threshold_field()

    @property
    def bulk(self) -> bool:
        """A whole --file to --out (locally, or on Ray with --ray) rather than results printed."""
        return bool(self.out_file or self.ray_address)

    def predictor_options(self) -> dict:
        """How texts become results (``runtime.Predictor``'s options but the batch size)."""
        return dict(stride=self.stride, max_length=self.max_length, aggregation=self.aggregation, top_k=self.top_k,
                    normalize=self.normalize, exit_threshold=self.exit_threshold)

    def validate(self) -> None:
        if self.text_column and not self.file_:
            raise UserError("--text-column names a column of --file: give --file")
        if self.bulk:
            if not self.file_ or self.texts or self.context is not None:
                raise UserError(BULK_ONLY)
            if not self.out_file:
                raise UserError("--ray writes to --out: give --out out.jsonl or out.parquet")


@dataclass(kw_only=True)
class ServeSettings:
    """``bertexport serve``: artifacts behind HTTP, one process (uvicorn) or a Ray Serve deployment."""

    artifacts: list[Path] = option(help="The artifact folders to serve.", argument=True)
    host: str = option("127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    port: int = option(8000, "Port to listen on (0: a free one, printed when listening).", min=0, max=65535)
    model_names: list[str] = option(
        help="The model id clients send and /v1/models lists; repeat it for several artifacts, in order (default: the "
             "artifact folder's name).", flag="--model-name", default_factory=list)
    api_key: str | None = option(
        None, "Require 'Authorization: Bearer KEY' on every endpoint but /health and /ready (also BERTEXPORT_API_KEY; "
              "a key on the command line is visible to other users of this machine: prefer the variable or a file).",
        envvar=API_KEY_ENV, show_envvar=True)
    api_key_file: Path | None = option(None, "As --api-key, the key being this file's first line.")
    metrics_open: bool = option(False, "With a key: leave /metrics open (for a scraper without the key).")
    trusted_key: Path | None = trusted_key_field()
    threads: int | None = threads_field(None, 
        "Runtime threads of each model (default: the runtime's own for one model; for several, this machine's cores "
        "split between them).")
    max_batch_tokens: int = option(
        4096, "Coalesce concurrent requests into one batch until their texts hold this many tokens...", min=1)
    max_wait_ms: float = option(2.0, "...or until the oldest request has waited this long.", min=0)
    queue_size: int = option(256, "Requests waiting for inference; when full, new ones get 503 with Retry-After.", min=1)
    max_texts: int = option(256, "Texts in one request.", min=1)
    max_chars: int = option(
        200_000, "Characters in one request (all its texts; long texts are windowed as `run` does).", min=1)
    max_body_bytes: int = option(4 << 20, "Request body size.", min=1)
    batch_size: int = option(
        SERVE_BATCH_SIZE, "Windows per inference call (the coalesced windows are sorted by length first; small batches "
                          "pad less).", min=1)
    top_k: int = option(1, "As `run --top-k`.", min=1)
    stride: int | None = option(None, "As `run --stride`.", min=0)
    max_length: int | None = option(None, "As `run --max-length`.", min=8)
    aggregation: str = option("mean", "As `run --aggregation`.", choices=("mean", "max"))
    normalize: bool | None = option(None, "As `run --normalize`.", flag="--normalize/--no-normalize")
    grace: float = option(30.0, "On SIGTERM, seconds to let in-flight requests finish.", min=0)
    # serve --ray: the same app as a Ray Serve deployment (shipping.ray_serve)
    ray_address: str | None = ray_address_field(
        "Serve as a Ray Serve deployment: on a local Ray instance (no ADDRESS) or the cluster at ADDRESS (its nodes "
        "read the artifact paths and have bertexport installed). Needs a fixed --port.")
    replicas: int | None = option(
        None, "With --ray: replicas, each with its own copy of the models and its own batcher (default 1; with "
              "--min/--max-replicas, the number to start with).", min=1)
    min_replicas: int | None = option(None, "With --ray: autoscale from this many...", min=0)
    max_replicas: int | None = option(None, "...to this many replicas.", min=1)
    exit_threshold: float | None = exit_threshold_field()

    def request_limits(self) -> dict:
        """``serve_requests.ServeOptions``' fields: batching, queue and request limits."""
        return dict(max_batch_tokens=self.max_batch_tokens, max_wait_ms=self.max_wait_ms, queue_size=self.queue_size,
                    max_texts=self.max_texts, max_chars=self.max_chars, max_body_bytes=self.max_body_bytes)

    def predictor_options(self) -> dict:
        """How texts become results (``runtime.Predictor``'s options)."""
        return dict(batch_size=self.batch_size, top_k=self.top_k, stride=self.stride, max_length=self.max_length,
                    aggregation=self.aggregation, normalize=self.normalize, exit_threshold=self.exit_threshold)

    def validate(self) -> None:
        if self.api_key is not None and self.api_key_file is not None:
            raise UserError(f"give --api-key (or {API_KEY_ENV}) or --api-key-file, not both")
        if self.ray_address is None and (self.replicas is not None or self.min_replicas is not None
                                         or self.max_replicas is not None):
            raise UserError("--replicas, --min-replicas and --max-replicas are for --ray")


@dataclass(kw_only=True)
class VerifySettings:
    """``bertexport verify``: an artifact's files against its manifest (and its signature)."""

    artifact: Path = option(help="The artifact folder to verify.", argument=True)
    trusted_key: Path | None = trusted_key_field()


@dataclass(kw_only=True)
class SignSettings:
    """``bertexport sign``: sign an artifact (OpenSSF model-signing, key-pair mode)."""

    artifact: Path = option(help="The artifact folder to sign.", argument=True)
    key: Path = option(help="Private key (PEM, elliptic curve, e.g. P-256).")
    password: str | None = option(None, "Password of the private key (also BERTEXPORT_KEY_PASSWORD).",
                                  envvar="BERTEXPORT_KEY_PASSWORD")


PACK_OPTIONS = {"max_batch_size": "--max-batch-size", "model_name": "--model-name"}  # with --format triton only


@dataclass(kw_only=True)
class PackSettings:
    """``bertexport pack``: one ``.tar.gz`` (+ ``.sha256``) for shipping, or a Triton model repository."""

    artifact: Path = option(help="The artifact folder to pack.", argument=True)
    out: Path | None = option(
        None, "Pack file (default: ARTIFACT.tar.gz); with --format triton the repository folder (default: "
              "ARTIFACT-triton).", flag=("--out", "-o"))
    force: bool = option(False, "Replace --out if it is a bertexport pack (never another file).")
    fmt: str = option(  # no choices here: ``packing.pack`` names the formats it knows when refusing one
        "tar.gz", "tar.gz: one file for shipping; triton: an NVIDIA Triton model repository (model + Python-backend "
                  "tokenizer + ensemble; not served on this machine).", flag="--format", metavar="[tar.gz|triton]")
    max_batch_size: int | None = option(
        None, "With --format triton: max_batch_size of the models (default 32; a TensorRT engine's largest batch).",
        min=1)
    model_name: str | None = option(
        None, "With --format triton: the ensemble's name clients call (default: the artifact folder's name).")

    def triton_options(self) -> dict:
        """The Triton options given (``packing.pack``'s ``**options``)."""
        return {k: getattr(self, k) for k in PACK_OPTIONS if getattr(self, k) is not None}

    def validate(self) -> None:
        given = self.triton_options()
        if given and self.fmt == "tar.gz":
            raise UserError(f"{', '.join(PACK_OPTIONS[k] for k in given)}: only with --format triton")


@dataclass(kw_only=True)
class UnpackSettings:
    """``bertexport unpack``: a pack unpacked safely and verified."""

    pack_file: Path = option(help="The pack (.tar.gz) to unpack.", argument=True)
    out: Path = option(help="Artifact folder to create.", flag=("--out", "-o"))
    force: bool = option(False, "Replace --out if it is a bertexport artifact (never a folder of other files).")
    trusted_key: Path | None = trusted_key_field()


@dataclass(kw_only=True)
class InspectSettings:
    """``bertexport inspect``: an artifact folder or pack summarised."""

    path: Path = option(help="An artifact folder or a pack.", argument=True)


@dataclass(kw_only=True)
class CacheSettings:
    """``bertexport cache``: what the cache holds; pruned or cleared."""

    prune: bool = option(False, "Remove orphaned work folders and entries not used for --older-than days.")
    older_than: int = option(30, "Days; with --prune.", min=0)
    clear: bool = option(False, "Remove everything in the cache.")
