"""Grouping token sequences into padded (or packed) batches of similar length: the one batching used by encode and
serving.

Sorting by length before batching means each batch pads to a length close to its rows' own, so little compute is
spent on padding; the caller restores the input order from the returned indices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from bidir_core.packed import pack

PACKED_DEFAULT = {"cpu": True, "cuda": False}
"""Whether encode() / predict() (and the serve torch backend) pack by default, per device type: the faster path by
benchmarks/bench_encode.py and bench_batch_embed.py on CPU (figures: the core README, "Packed batches"). CUDA stays
padded until benchmarks/gpu_suite.sh's packed rows have a measurement to decide it."""
PACKED_TOKENS = 4096
"""encode()'s and predict()'s default real-token budget per packed batch."""


def length_sorted_batches(
    lengths: Sequence[int],
    batch_size: int,
    max_tokens: int | None = None,
    padded: bool = True,
    max_padding: float | None = None,
) -> list[list[int]]:
    """Indices of the rows grouped longest-first into batches of at most batch_size rows and, when max_tokens is
    given, at most max_tokens tokens: padded tokens (rows x longest row), or with padded=False the real tokens
    of a packed batch (the sum of the lengths). A single longer row still gets its own batch. With max_padding
    (padded batches), a row that would make more than that fraction of its batch's padded tokens padding starts a
    new batch: where compute is linear in padded tokens (a CPU), a batch of rows of unlike lengths costs more than
    the same rows in a few batches of like lengths."""
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
        wasteful = padded and max_padding is not None and total + lengths[i] < (1 - max_padding) * tokens
        if current and (
            len(current) == batch_size or (max_tokens is not None and tokens > max_tokens) or wasteful
        ):
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


def batched_forward(
    forward: Callable[..., torch.Tensor],
    ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    *,
    batch_size: int,
    packed: bool | None,
    max_tokens: int | None,
    show_progress_bar: bool = False,
    desc: str = "encode",
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """forward over token id rows in length-sorted batches: (the rows' indices, forward's output for them) per
    batch, in batch order (the caller puts the rows back in input order).

    packed (None: PACKED_DEFAULT for the device): each batch is one PackedBatch of at most max_tokens real tokens
    (default PACKED_TOKENS) and batch_size rows, forward(packed); else forward(input_ids, attention_mask) on
    right-padded batches of batch_size rows (and at most max_tokens padded tokens when given)."""
    packed = PACKED_DEFAULT[device.type] if packed is None else packed
    if packed:
        max_tokens = max_tokens or PACKED_TOKENS
    batches = length_sorted_batches([len(row) for row in ids], batch_size, max_tokens, padded=not packed)
    with tqdm(total=len(ids), disable=not show_progress_bar, desc=desc, unit="text") as progress:
        for batch in batches:
            rows = [ids[i] for i in batch]
            if packed:
                out = forward(pack(rows).to(device))
            else:
                input_ids, attention_mask = pad_batch(rows, pad_id)
                out = forward(input_ids.to(device), attention_mask.to(device))
            yield batch, out
            progress.update(len(batch))
