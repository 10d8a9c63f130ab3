"""Dynamic batching for ``bertexport serve``: per served model, one inference thread
coalesces concurrent requests into one ``Predictor.predict`` call (several models in one
server each have their own ``Batcher``: their own queue and thread, so a flood on one
queues behind its own model only).

Requests wait in a bounded queue (a full queue is refused at once, never grown). The
worker takes the oldest request, then keeps taking queued ones while their tokens fit the
token budget and the oldest has waited less than ``max_wait`` seconds (measured from its
arrival, so a request that already queued behind a busy worker does not wait again). It
waits for requests not yet arrived only while they have recently been arriving closer
together than ``max_wait`` (a moving average of the gaps between arrivals): a lone client
never waits. The
texts of all taken requests go through ``Predictor.predict`` together — which windows long
texts and batches windows by length exactly as ``bertexport run`` does — and each request
gets its own answers back, in order. A request whose texts make the batch fail is found by
re-running the requests one at a time, so it cannot fail the others.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("bertexport.shipping.serve")


class QueueFull(Exception):
    """The request queue is at its bound: the caller should answer 503 and retry later."""


@dataclass
class Job:
    texts: list[str]
    pairs: list[str] | None
    mode: str | None = None  # which predict function answers it (None: the default one)
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)  # per text, special tokens included


@dataclass
class BatchStats:
    """What one inference call carried (for metrics)."""

    requests: int
    texts: int
    tokens: int
    seconds: float


_STOP = object()


class Batcher:
    """``submit(texts, pairs, mode)`` -> a ``Future`` of ``(results, token_counts)``.

    ``predict(texts, pairs)`` (or ``modes[mode](texts, pairs)`` for a job submitted with a
    ``mode``: e.g. reranking through the same model) is called only from the worker thread,
    and so is ``count_tokens(texts, pairs)``: neither needs to be thread-safe. Jobs of
    different modes are never coalesced into one call. One ``Batcher`` per served model:
    each has its own queue and its own worker thread."""

    def __init__(self, predict: Callable, count_tokens: Callable, *, max_batch_tokens: int, max_wait: float,
                 queue_size: int, on_batch: Callable[[BatchStats], None] | None = None,
                 modes: dict[str, Callable] | None = None, name: str = ""):
        if max_batch_tokens < 1 or max_wait < 0 or queue_size < 1:
            raise ValueError("max_batch_tokens and queue_size must be >= 1, max_wait >= 0")
        self._predict = predict
        self._modes = dict(modes or {})
        self.name = name
        self._count = count_tokens
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._on_batch = on_batch
        self._thread: threading.Thread | None = None
        self._last_arrival = 0.0
        self._gap = float("inf")  # moving average of the time between arrivals

    # -- the caller's side ----------------------------------------------------------------

    def submit(self, texts: list[str], pairs: list[str] | None = None, mode: str | None = None) -> Future:
        if mode is not None and mode not in self._modes:
            raise ValueError(f"unknown mode {mode!r}")
        job = Job(list(texts), list(pairs) if pairs is not None else None, mode)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        if self._last_arrival:  # an idle spell counts as a few slow arrivals, not as hours
            gap = min(job.arrived - self._last_arrival, 4 * self.max_wait)
            self._gap = gap if self._gap == float("inf") else 0.8 * self._gap + 0.2 * gap
        self._last_arrival = job.arrived
        return job.future

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not yet taken by the worker)."""
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Batcher":
        self._thread = threading.Thread(target=self._loop, name=f"bertexport-inference{'-' + self.name if self.name else ''}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Answer everything already queued, then end the worker."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    # -- the worker -------------------------------------------------------------------------

    def _loop(self) -> None:
        carry = None
        while True:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is _STOP:
                return
            jobs = [job]
            try:
                jobs, carry = self._gather(job)
                self._answer(jobs)
            except BaseException as e:  # noqa: BLE001 - a bug here must fail requests, not the worker
                log.exception("the inference worker failed a batch")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))

    def _tokens(self, job: Job) -> int:
        if not job.tokens:
            try:
                job.tokens = list(self._count(job.texts, job.pairs))
            except Exception:  # noqa: BLE001 - the model call will say what is wrong with these texts
                job.tokens = [0] * len(job.texts)
        return sum(job.tokens)

    def _gather(self, first: Job):
        """``first`` and the queued jobs that fit the budget; the one that did not fit (or
        the stop mark) is carried to the next batch."""
        jobs, tokens = [first], self._tokens(first)
        deadline = first.arrived + self.max_wait
        while tokens < self.max_batch_tokens:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._gap >= self.max_wait:  # nothing is likely to come in time
                    break
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if nxt is _STOP:
                return jobs, nxt
            more = self._tokens(nxt)
            if (tokens + more > self.max_batch_tokens or (nxt.pairs is None) != (first.pairs is None)
                    or nxt.mode != first.mode):
                return jobs, nxt  # over budget, texts and (text, pair)s, or another mode: never in one call
            jobs.append(nxt)
            tokens += more
        return jobs, None

    def _answer(self, jobs: list[Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # a caller gone: skip its texts
        if not live:
            return
        start = time.perf_counter()
        try:
            results = self._call(live)
        except Exception as e:  # noqa: BLE001 - isolate the request that fails, answer the others
            if len(live) == 1:
                live[0].future.set_exception(e)
                return
            for j in live:
                try:
                    res = self._call([j])
                except Exception as single:  # noqa: BLE001
                    j.future.set_exception(single)
                else:
                    j.future.set_result((res, j.tokens))
            return
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(live), sum(len(j.texts) for j in live), sum(sum(j.tokens) for j in live),
                                      time.perf_counter() - start))
        at = 0
        for j in live:
            j.future.set_result((results[at:at + len(j.texts)], j.tokens))
            at += len(j.texts)

    def _call(self, jobs: list[Job]) -> list:
        texts = [t for j in jobs for t in j.texts]
        pairs = [p for j in jobs for p in j.pairs] if jobs[0].pairs is not None else None
        predict = self._predict if jobs[0].mode is None else self._modes[jobs[0].mode]
        return predict(texts, pairs)
