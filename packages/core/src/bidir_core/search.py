"""Exact (brute-force) nearest-neighbour search by dot product, over a corpus seen chunk by chunk.

Memory stays bounded for corpora of millions of rows: only one corpus chunk's scores exist at a time, for a block of
queries, and a running top-k is merged after each chunk. Ties are broken deterministically: among equal scores
the lower corpus index wins (including at the k-th place), on CPU and GPU alike.
"""

from __future__ import annotations

import torch

from bidir_core.errors import BidirError

# Scores held at once per (query block x corpus chunk): 2**24 fp32 scores + their int64 keys is ~200 MB.
_BLOCK_ELEMENTS = 2**24
_LOW32 = 0xFFFFFFFF


class RunningTopK:
    """The k best (score, corpus index) per query over the corpus chunks added so far, best first."""

    def __init__(self, queries: torch.Tensor, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise BidirError(f"k must be a positive integer, got {k!r}")
        if queries.ndim != 2:
            raise BidirError(f"queries must be a (Q, D) matrix, got shape {tuple(queries.shape)}")
        self.queries = queries.float()  # (Q, D)
        self.k = k
        self.seen = 0  # corpus rows added so far: the global index of the next chunk's first row
        # One int64 per kept hit that orders like (score, -index): see _keys. (Q, <= k)
        self.keys = torch.empty((len(queries), 0), dtype=torch.int64, device=queries.device)

    def add(self, chunk: torch.Tensor) -> None:
        """Score the next corpus rows (C, D) against every query and keep the k best per query."""
        if chunk.ndim != 2 or chunk.shape[1] != self.queries.shape[1]:
            raise BidirError(
                f"corpus chunk must be (C, {self.queries.shape[1]}), got shape {tuple(chunk.shape)}"
            )
        if self.seen + len(chunk) > _LOW32:
            raise BidirError(f"exact search supports at most {_LOW32} corpus rows")
        chunk = chunk.to(device=self.queries.device, dtype=torch.float32)
        rows = max(1, _BLOCK_ELEMENTS // max(1, len(chunk)))
        merged = []
        for start in range(0, len(self.queries), rows):
            scores = self.queries[start : start + rows] @ chunk.T  # (q, C)
            keys = torch.cat(
                [self.keys[start : start + rows], _keys(scores, self.seen)], dim=1
            )  # (q, kept + C)
            merged.append(keys.topk(min(self.k, keys.shape[1]), dim=1).values)  # sorted, best first
        self.seen += len(chunk)
        self.keys = torch.cat(merged) if merged else self.keys.new_empty((0, min(self.k, self.seen)))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """scores (Q, min(k, N)) fp32 and corpus indices (Q, min(k, N)) int64, best first."""
        ordered = (self.keys >> 32).to(torch.int32)
        bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
        return bits.view(torch.float32), _LOW32 - (self.keys & _LOW32)


def _keys(scores: torch.Tensor, offset: int) -> torch.Tensor:
    """int64 keys (q, C) whose order is (score descending, then corpus index ascending), so topk has no ties.

    The high 32 bits are the fp32 score's bits turned into an int32 with the same order (for negative floats the
    magnitude bits are flipped); the low 32 bits are (2**32 - 1 - global index), so the lower index is the larger key.
    """
    bits = scores.contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    index = torch.arange(offset, offset + scores.shape[1], device=scores.device, dtype=torch.int64)
    return (ordered << 32) + (_LOW32 - index)


def exact_search(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k corpus rows by dot product for each query: (Q, D) x (N, D) -> scores, indices (Q, min(k, N)), best first.

    The corpus is scored chunk_size rows at a time (on the queries' device) with a running top-k merge.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise BidirError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    top = RunningTopK(queries, k)
    if corpus.ndim != 2:
        raise BidirError(f"corpus must be an (N, D) matrix, got shape {tuple(corpus.shape)}")
    for start in range(0, len(corpus), chunk_size):
        top.add(corpus[start : start + chunk_size])
    return top.result()
