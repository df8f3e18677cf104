"""Grouping token sequences into padded (or packed) batches of similar length: the one batching used by encode and
serving.

Sorting by length before batching means each batch pads to a length close to its rows' own, so little compute is
spent on padding; the caller restores the input order from the returned indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def length_sorted_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None, padded: bool = True
) -> list[list[int]]:
    """Indices of the rows grouped longest-first into batches of at most batch_size rows and, when max_tokens is
    given, at most max_tokens tokens: padded tokens (rows x longest row), or with padded=False the real tokens
    of a packed batch (the sum of the lengths). A single longer row still gets its own batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep input order
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0  # real tokens in current
    for i in order:
        # Rows arrive longest first, so the batch's padded length is that of its first row.
        if padded:
            tokens = (len(current) + 1) * (lengths[current[0]] if current else lengths[i])
        else:
            tokens = total + lengths[i]
        if current and (len(current) == batch_size or (max_tokens is not None and tokens > max_tokens)):
            batches.append(current)
            current, total = [], 0
        current.append(i)
        total += lengths[i]
    if current:
        batches.append(current)
    return batches


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T) int64, T the longest sequence (at least 1)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    T = max([len(s) for s in sequences] + [1])
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(0, n) if padding_side == "right" else slice(T - n, T)
        ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask
