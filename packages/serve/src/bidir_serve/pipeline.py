"""Rows -> windows of padded token batches, made on a background thread so tokenization overlaps the model's compute.

Rows come shard by shard (shard k = rows [k * shard_size, (k + 1) * shard_size) of the input, bidir_serve.input_plan,
so a shard's content does not depend on how many processes run or which shards were already done). Within a shard,
rows are taken in windows of `window` rows; each window is tokenized, sorted by token length and grouped into
token-budget batches by bidir_core.batching, so padding stays small while memory stays bounded by the window,
whatever the corpus or shard size. A Window is the one message from the tokenizer to the model: its rows' ids (in input order) and their batches
together; each batch carries its rows' positions inside the window, which is how the consumer restores input order
before it appends the window to its shard.

The producer thread puts the windows on a bounded queue (at most `prefetch` windows ahead), then None; a failure in
the producer is put on the queue as the exception, and re-raised by the consumer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from bidir_core.batching import length_sorted_batches, pad_batch
from bidir_core.tokenization import tokenize
from bidir_serve.inputs import Row


@dataclass(frozen=True)
class Batch:
    """Some rows of a window, padded to their longest."""

    positions: list[int]
    """Row index inside the window of each batch row."""
    input_ids: torch.Tensor
    """(B, T) int64, right-padded; pinned when the backend copies to a GPU."""
    attention_mask: torch.Tensor
    """(B, T) int64."""
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
    pad_id: int
    pin_memory: bool = False
    """Pin batches in page-locked memory, so the copy to the GPU can be asynchronous."""


def shard_windows(
    shards: Iterable[tuple[int, Iterable[Row]]],
    tokenizer,
    prefix: str,
    cfg: BatchingConfig,
) -> Iterator[Window]:
    """The windows of each (shard index, its rows), in order. A window ends when it is full or its shard ends
    (windows never span shards)."""
    for shard, rows in shards:
        pending: list[Row] = []
        for row in rows:
            if len(pending) == cfg.window:
                yield make_window(shard, pending, False, tokenizer, prefix, cfg)
                pending = []
            pending.append(row)
        yield make_window(shard, pending, True, tokenizer, prefix, cfg)


def tokenize_rows(rows: list[Row], tokenizer, prefix: str, max_length: int) -> tuple[list[list[int]], int]:
    """Each row's token ids (prefix prepended, truncated to max_length) and how many rows were cut."""
    return tokenize(tokenizer, [prefix + row.text for row in rows], max_length)


def batch_window(token_ids: list[list[int]], cfg: BatchingConfig) -> list[Batch]:
    """A window's rows sorted by length and grouped into padded batches (each row in exactly one)."""
    lengths = [len(t) for t in token_ids]
    batches = []
    for batch in length_sorted_batches(lengths, cfg.max_batch_size, cfg.max_batch_tokens):
        input_ids, mask = pad_batch([token_ids[i] for i in batch], cfg.pad_id)  # (B, T) each
        if cfg.pin_memory:
            input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
        batches.append(Batch(batch, input_ids, mask, sum(lengths[i] for i in batch)))
    return batches


def make_window(
    shard: int, rows: list[Row], last: bool, tokenizer, prefix: str, cfg: BatchingConfig
) -> Window:
    token_ids, n_cut = tokenize_rows(rows, tokenizer, prefix, cfg.max_length)
    batches = batch_window(token_ids, cfg)
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
