"""Rows -> padded token batches, produced on a background thread so tokenization overlaps the model's compute.

Rows are cut into shards (shard k = rows [k * shard_size, (k + 1) * shard_size) of the input, so a shard's content
does not depend on how many processes run or which shards were already done). Within a shard, rows are taken in
windows of `window` rows; each window is tokenized, sorted by token length and grouped into token-budget batches by
bidir_core.batching, so padding stays small while memory stays bounded by the window, whatever the corpus or shard
size. Each batch carries its rows' positions inside the window, which is how the consumer restores input order; a
WindowDone follows a window's last batch (its rows can then be appended to the shard in order), and a ShardDone
follows a shard's last window.

The producer thread puts these items on a bounded queue (at most `prefetch` items ahead), then None; a failure in
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
    shard: int
    window_rows: int
    """Rows in this batch's window."""
    positions: list[int]
    """Row index inside the window of each batch row."""
    input_ids: torch.Tensor
    """(B, T) int64, right-padded; pinned when the backend copies to a GPU."""
    attention_mask: torch.Tensor
    """(B, T) int64."""
    tokens: int
    """Real (unpadded) tokens in the batch."""
    wheres: list[str]
    """file:line (or file row N) of each batch row, for error messages."""


@dataclass(frozen=True)
class WindowDone:
    shard: int
    ids: list[str]
    """The window's ids in input order (the next rows of the shard)."""
    truncated: int
    """Rows of the window cut to max_length."""


@dataclass(frozen=True)
class ShardDone:
    shard: int


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


def shard_batches(
    rows: Iterable[Row],
    shard_size: int,
    todo: set[int],
    tokenizer,
    prefix: str,
    cfg: BatchingConfig,
) -> Iterator[Batch | WindowDone | ShardDone]:
    """Batches of the shards in `todo`, window by window; other shards' rows are skipped."""
    shard, window = -1, []  # window: (id, text, where) rows

    def flush() -> Iterator[Batch | WindowDone]:
        token_ids, n_cut = tokenize(tokenizer, [prefix + text for _, text, _ in window], cfg.max_length)
        lengths = [len(t) for t in token_ids]
        for batch in length_sorted_batches(lengths, cfg.max_batch_size, cfg.max_batch_tokens):
            input_ids, mask = pad_batch([token_ids[i] for i in batch], cfg.pad_id)  # (B, T) each
            if cfg.pin_memory:
                input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
            tokens = sum(lengths[i] for i in batch)
            yield Batch(shard, len(window), batch, input_ids, mask, tokens, [window[i][2] for i in batch])
        yield WindowDone(shard, [row_id for row_id, _, _ in window], n_cut)
        window.clear()

    for n, row in enumerate(rows):
        k = n // shard_size
        if k != shard:
            if window:
                yield from flush()
            if shard in todo:
                yield ShardDone(shard)
            shard = k
        if k not in todo:
            continue
        window.append((row.id, row.text, row.where))
        if len(window) == cfg.window:
            yield from flush()
    if window:
        yield from flush()
    if shard in todo:
        yield ShardDone(shard)


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
