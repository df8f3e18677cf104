"""The dynamic batcher: concurrent requests' inputs merged into length-sorted, token-budget model batches.

The event loop submits each request's token id lists as a Job (a bounded number at once: `slot()` refuses the
request past --max-concurrency with a 429 at once, so the queue cannot grow without bound) and awaits its future.
ONE model thread owns the backend: it loads it, runs a warm-up batch, then loops: wait for a job; wait until the
queued jobs hold --max-batch-tokens tokens or the oldest has waited --max-wait-ms (no wait once shutdown began);
take the queued jobs in arrival order up to that budget (at least one); sort all their rows by length and cut them
into batches with bidir_core.batching (the grouping batch-embed uses); hand each batch's token rows to the backend
(prepare, then embed, or score for a reranker: the backend builds its own input form) and write each row's vector
(or score) into its job's array; a job's future is resolved when its last row is in, so no request sees another's
rows. An embedder's rows are texts, a reranker's are (query, passage) pairs: both are token rows here, so pairs of
concurrent rerank requests share batches as texts do.

A job cancelled before it runs (its client disconnected, or its handler was cancelled) is taken off the queue; rows
of a cancelled job that was already taken are skipped before each batch runs. A batch that fails (an exception, or
non-finite outputs) fails the requests in it with a 500 and the thread goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from bidir_core.batching import length_sorted_batches
from bidir_core.errors import BidirError
from bidir_core.reranker_config import RERANKER, tokenize_pairs
from bidir_core.tokenization import tokenize
from bidir_serve.backends import Backend, Scorer, backend_kind
from bidir_serve.server.config import ServerConfig
from bidir_serve.server.errors import ApiError, overloaded, unavailable
from bidir_serve.server.metrics import Metrics

log = logging.getLogger("bidir_serve.server")

POLL = 0.05
"""Longest sleep of the model thread while it waits to fill a batch: how soon it sees a shutdown (set from a
signal handler, which must not take the lock to notify it)."""


@dataclass(eq=False)
class Job:
    """One request's inputs on their way through the model."""

    ids: list[list[int]]
    tokens: int
    arrived: float
    """time.monotonic() at submit."""
    future: asyncio.Future
    """Resolved (on the event loop) with the (len(ids), dim) float32 embeddings (a reranker's (len(ids),) float32
    scores) in input order, or an ApiError."""
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False
    """Set by the event loop: the rows not yet run are dropped."""
    done: bool = False
    """Set by the model thread once the future is settled."""
    out: np.ndarray | None = field(default=None, repr=False)
    left: int = 0


class Batcher:
    def __init__(
        self,
        cfg: ServerConfig,
        load: Callable[[], Backend | Scorer],
        metrics: Metrics,
        on_fatal: Callable[[BaseException], None],
    ):
        self.cfg = cfg
        self._load, self._metrics, self._on_fatal = load, metrics, on_fatal
        self.backend: Backend | Scorer | None = None
        self.state = "loading"
        """loading, ready, failed (load_error says why) or stopped."""
        self.load_error: BaseException | None = None
        self.admitted = 0
        """Requests holding a slot (touched by the event loop only)."""
        self._queue: deque[Job] = deque()
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._stopping = False
        self.flushing = False
        """Shutdown began: run what is queued without waiting for more (a plain flag, safe to set anywhere)."""
        self._thread = threading.Thread(target=self._run, name="bidir-model", daemon=True)
        metrics.queue_depth.set_function(lambda: len(self._queue))
        metrics.in_flight.set_function(lambda: self.admitted)
        metrics.ready.set_function(lambda: float(self.state == "ready"))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Run what is queued, then end the model thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        if self.state == "ready":
            self.state = "stopped"

    # event loop side

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Admit one request, or refuse it at once with a 429 when --max-concurrency are in."""
        if self.admitted >= self.cfg.max_concurrency:
            raise overloaded(
                f"the server is busy: {self.admitted} requests are in progress, the limit is "
                f"{self.cfg.max_concurrency} (--max-concurrency); retry later"
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    def submit(self, ids: list[list[int]]) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(ids, sum(map(len, ids)), time.monotonic(), loop.create_future(), loop)
        with self._cond:
            if self._stopping:
                raise unavailable("the server is shutting down", "shutting_down")
            self._queue.append(job)
            self._queued_tokens += job.tokens
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job whose client is gone: off the queue if it is still there, else its rows not yet run."""
        job.cancelled = True
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self._queued_tokens -= job.tokens
                self._metrics.dropped.inc(len(job.ids))
                self._cond.notify_all()

    # model thread

    def _run(self) -> None:
        try:
            backend = self._load()
            self._warm_up(backend)
        except BaseException as e:  # reported by the CLI as its exit; the server stops
            self.load_error, self.state = e, "failed"
            self._on_fatal(e)
            return
        self.backend, self.state = backend, "ready"
        shape = (
            "scores (query, passage) pairs"
            if backend_kind(backend) == RERANKER
            else f"{backend.dim} dimensions"
        )
        log.info("model ready: %s, %s, max_length %d", backend.description, shape, backend.config.max_length)
        while jobs := self._take():
            self._embed(backend, jobs)

    def _warm_up(self, backend: Backend | Scorer) -> None:
        """One small batch through the whole path, so the first request does not pay for lazy initialization; a
        model that gives non-finite outputs is refused here rather than answering requests with them."""
        if backend_kind(backend) == RERANKER:
            ids, _ = tokenize_pairs(backend.tokenizer, backend.config, [("warm-up", "warm-up")])
            what = "scores for its warm-up pair"
        else:
            ids, _ = tokenize(
                backend.tokenizer, [backend.config.passage_prefix + "warm-up"], backend.config.max_length
            )
            what = "embeddings for its warm-up text"
        if not np.isfinite(_forward(backend, backend.prepare(ids))).all():
            raise BidirError(
                f"{self.cfg.model}: the model produced non-finite (nan/inf) {what} "
                "(check the model: NaN weights, a broken export, fp16 overflow: try --precision bf16 or fp32)"
            )

    def _take(self) -> list[Job]:
        """The next jobs to run ([] once stopping and nothing is queued)."""
        budget = self.cfg.max_batch_tokens
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return []
                deadline = self._queue[0].arrived + self.cfg.max_wait_ms / 1000
                while self._queue and self._queued_tokens < budget and not (self.flushing or self._stopping):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(min(remaining, POLL))
                if not self._queue:  # every queued job was cancelled while we waited
                    continue
                jobs, tokens = [], 0
                while self._queue and (not jobs or tokens + self._queue[0].tokens <= budget):
                    job = self._queue.popleft()
                    self._queued_tokens -= job.tokens
                    jobs.append(job)
                    tokens += job.tokens
                return jobs

    def _embed(self, backend: Backend | Scorer, jobs: list[Job]) -> None:
        rows = [(job, i) for job in jobs for i in range(len(job.ids))]
        lengths = [len(job.ids[i]) for job, i in rows]
        width = () if backend_kind(backend) == RERANKER else (backend.dim,)  # a score per row, or a vector
        for job in jobs:
            job.out, job.left = np.empty((len(job.ids), *width), np.float32), len(job.ids)
        cfg = self.cfg
        for batch in length_sorted_batches(
            lengths, cfg.max_batch_size, cfg.max_batch_tokens, max_padding=backend.max_padding
        ):
            live = [r for r in batch if not (rows[r][0].cancelled or rows[r][0].done)]
            dropped = sum(1 for r in batch if rows[r][0].cancelled and not rows[r][0].done)
            if dropped:
                self._metrics.dropped.inc(dropped)
            if not live:
                continue
            try:
                emb = _forward(backend, backend.prepare([rows[r][0].ids[rows[r][1]] for r in live]))
                if not np.isfinite(emb).all():
                    raise ApiError(
                        500,
                        f"the model produced non-finite (nan/inf) {'scores' if emb.ndim == 1 else 'embeddings'}",
                        type="server_error",
                        code="non_finite",
                    )
            except Exception as e:
                if not isinstance(e, ApiError):
                    log.exception("a batch of %d rows failed", len(live))
                    e = ApiError(
                        500, f"the model failed on a batch ({type(e).__name__})", type="server_error"
                    )
                for job in {rows[r][0] for r in live}:
                    self._settle(job, e)
                continue
            # padded size: rows x the longest (at least 1 column), what a padded batch of them holds
            padded = len(live) * max([lengths[r] for r in live] + [1])
            self._metrics.batch(len(live), padded, sum(lengths[r] for r in live))
            for k, r in enumerate(live):
                job, i = rows[r]
                job.out[i] = emb[k]
                job.left -= 1
                if job.left == 0:
                    self._settle(job, job.out)

    @staticmethod
    def _settle(job: Job, result: np.ndarray | ApiError) -> None:
        job.done = True

        def settle() -> None:
            if job.future.done():  # cancelled meanwhile
                return
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            job.loop.call_soon_threadsafe(settle)


def _forward(backend: Backend | Scorer, inputs) -> np.ndarray:
    """An embedder's (B, dim) embeddings or a reranker's (B,) scores of prepared rows."""
    return backend.score(inputs) if backend_kind(backend) == RERANKER else backend.embed(inputs)
