"""Windows: rows -> windows of token batches in the backend's input form, made on a background thread so
tokenization and batch preparation overlap the model's compute, and a window's embeddings in input order.

Rows come shard by shard (shard k = rows [k * shard_size, (k + 1) * shard_size) of the input, plan.py,
so a shard's content does not depend on how many processes run or which shards were already done). Within a shard,
rows are taken in windows of `window` rows; each window is tokenized, sorted by token length and grouped into
token-budget batches by bidir_core.batching, so padding stays small while memory stays bounded by the window,
whatever the corpus or shard size; each batch's token rows are handed to the backend's prepare() there (packed,
or padded and pinned: the backend's choice, see bidir_serve.backends.base), so the model thread only runs them. A
Window is the one message from the tokenizer to the model: its rows' ids (in input order) and their batches
together; each batch carries its rows' positions inside the window, which is how the consumer restores input order
before it appends the window to its shard.

The producer thread puts the windows on a bounded queue (at most `prefetch` windows ahead), then None; a failure in
the producer is put on the queue as the exception, and re-raised by the consumer. There, embed_window runs a window's
batches through the model and puts each row back in input order; non-finite embeddings stop the job before the
window's shard is written.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bidir_core.batching import length_sorted_batches
from bidir_core.embeddings_artifact import shard_name
from bidir_core.errors import BidirError
from bidir_core.tokenization import tokenize
from bidir_serve.backends import Backend
from bidir_serve.batch.config import BatchEmbedConfig
from bidir_serve.batch.inputs import Row

Prepare = Callable[[list[list[int]]], Any]
"""A backend's prepare(): a batch's token rows -> its input form (Backend.prepare)."""


@dataclass(frozen=True)
class Batch:
    """Some rows of a window, ready for the backend."""

    positions: list[int]
    """Row index inside the window of each batch row."""
    inputs: Any
    """The rows as the backend's prepare() made them (a PackedBatch, or padded (B, T) tensors), for its embed()."""
    tokens: int
    """Real (unpadded) tokens in the batch."""


@dataclass(frozen=True)
class Window:
    """Consecutive rows of one shard, tokenized and batched."""

    shard: int
    ids: list[str]
    """The rows' ids in input order (the next rows of the shard)."""
    wheres: list[str]
    """file:line (or file row N) of each row, in the same order, for error messages."""
    batches: list[Batch]
    """Every row of the window exactly once, in batches of similar length."""
    truncated: int
    """Rows of the window cut to max_length."""
    last_in_shard: bool
    """Whether the shard is complete after this window."""


@dataclass(frozen=True)
class BatchingConfig:
    """How rows become batches."""

    max_length: int
    """Texts are truncated to this many tokens (the model's max_length)."""
    max_batch_tokens: int
    """Upper bound on rows x longest row of a batch."""
    max_batch_size: int
    """Upper bound on rows per batch."""
    window: int
    """Rows sorted together by length (bounded so memory does not grow with the corpus)."""
    max_padding: float | None = None
    """The backend's bound on a batch's padding (Backend.max_padding)."""


def shard_windows(
    shards: Iterable[tuple[int, Iterable[Row]]],
    tokenizer,
    prefix: str,
    cfg: BatchingConfig,
    prepare: Prepare,
) -> Iterator[Window]:
    """The windows of each (shard index, its rows), in order. A window ends when it is full or its shard ends
    (windows never span shards)."""
    for shard, rows in shards:
        pending: list[Row] = []
        for row in rows:
            if len(pending) == cfg.window:
                yield make_window(shard, pending, False, tokenizer, prefix, cfg, prepare)
                pending = []
            pending.append(row)
        yield make_window(shard, pending, True, tokenizer, prefix, cfg, prepare)


def tokenize_rows(rows: list[Row], tokenizer, prefix: str, max_length: int) -> tuple[list[list[int]], int]:
    """Each row's token ids (prefix prepended, truncated to max_length) and how many rows were cut."""
    return tokenize(tokenizer, [prefix + row.text for row in rows], max_length)


def batch_window(token_ids: list[list[int]], cfg: BatchingConfig, prepare: Prepare) -> list[Batch]:
    """A window's rows sorted by length, grouped into batches (each row in exactly one) and prepared."""
    lengths = [len(t) for t in token_ids]
    batches = []
    for batch in length_sorted_batches(
        lengths, cfg.max_batch_size, cfg.max_batch_tokens, max_padding=cfg.max_padding
    ):
        inputs = prepare([token_ids[i] for i in batch])
        batches.append(Batch(batch, inputs, sum(lengths[i] for i in batch)))
    return batches


def make_window(
    shard: int, rows: list[Row], last: bool, tokenizer, prefix: str, cfg: BatchingConfig, prepare: Prepare
) -> Window:
    token_ids, n_cut = tokenize_rows(rows, tokenizer, prefix, cfg.max_length)
    batches = batch_window(token_ids, cfg, prepare)
    return Window(shard, [r.id for r in rows], [r.where for r in rows], batches, n_cut, last)


def prefetch(items: Iterator, depth: int) -> Iterator:
    """Run the `items` generator on a background thread, at most `depth` items ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it in the main thread
            put(e)

    thread = threading.Thread(target=work, name="bidir-tokenize", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer stopped (done, or failed): let the producer exit instead of blocking on put
        thread.join()


def batching_config(cfg: BatchEmbedConfig, backend: Backend) -> BatchingConfig:
    return BatchingConfig(
        max_length=backend.config.max_length,
        max_batch_tokens=cfg.max_batch_tokens,
        max_batch_size=cfg.max_batch_size,
        window=cfg.window,
        max_padding=backend.max_padding,
    )


def embed_window(backend: Backend, window: Window, out: Path, model: str) -> np.ndarray:
    """The window's (rows, dim) float32 embeddings in input order; non-finite values are an error."""
    emb = np.empty((len(window.ids), backend.dim), np.float32)
    for batch in window.batches:
        part = backend.embed(batch.inputs)  # (B, dim)
        _check_finite(part, window, batch, out, model)
        emb[batch.positions] = part
    return emb


def warn_truncated(truncated: int, backend: Backend) -> None:
    if truncated:
        warnings.warn(
            f"{truncated} rows were longer than max_length={backend.config.max_length} tokens and were truncated",
            # here <- the engine <- embed_corpus <- its caller: the warning names the line that ran the job (the
            # Ray engine's, one frame deeper, names embed_corpus's)
            stacklevel=4,
        )


def _check_finite(emb: np.ndarray, window: Window, batch: Batch, out: Path, model: str) -> None:
    """nan/inf embeddings (a NaN checkpoint, a garbled export, fp16 overflow) stop the job before the shard is
    written: a shard of NaNs marked complete would pass for a result."""
    bad = ~np.isfinite(emb).all(axis=1)  # (B,)
    if bad.any():
        rows = [window.wheres[batch.positions[i]] for i in np.flatnonzero(bad)]
        raise BidirError(
            f"{out / shard_name(window.shard)}: the model ({model}) produced non-finite (nan/inf) embeddings for "
            f"{len(rows)} of the {len(emb)} rows of a batch, the first at {rows[0]}; nothing of this shard was "
            "written (check the model: NaN weights, a broken export, fp16 overflow: try --precision bf16 or fp32)"
        )
