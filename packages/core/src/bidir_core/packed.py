"""Packed batches: several texts as one token stream, no padding.

A packed batch is the concatenation of its texts' tokens, `input_ids (N,)`, with the offsets of each text in it,
`cu_seqlens (B + 1,)` (text i is tokens cu_seqlens[i]:cu_seqlens[i + 1]), and positions that restart at 0 for
every text, `position_ids (N,)`, so RoPE sees each text as if it were alone. Attention is restricted to each text
(bidir_core.packed_attention); pooling works per text (bidir_core.pooling.pool_packed). The padded
(input_ids, attention_mask) path stays what ONNX / TensorRT graphs take.

The lengths are kept on the host too (`lengths`): the attention kernels and the batching need them as Python ints,
and reading them back from a device tensor would be a sync per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # (N,) int64: every text's tokens, one after the other
    cu_seqlens: torch.Tensor  # (B + 1,) int64: text i is input_ids[cu_seqlens[i] : cu_seqlens[i + 1]]
    position_ids: torch.Tensor  # (N,) int64: 0, 1, ... within each text
    lengths: tuple[int, ...]  # (B,) on the host: tokens of each text (0 for an empty text)

    @property
    def num_texts(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths, default=0)

    def segment_ids(self) -> torch.Tensor:
        """(N,) int64: the index of the text each token belongs to."""
        counts = torch.as_tensor(self.lengths, dtype=torch.long, device=self.input_ids.device)
        return torch.repeat_interleave(torch.arange(self.num_texts, device=counts.device), counts)

    def token_seq_lens(self) -> torch.Tensor:
        """(N,) int64: the length of the text each token belongs to (what dynamic NTK RoPE scales by)."""
        counts = torch.as_tensor(self.lengths, dtype=torch.long, device=self.input_ids.device)
        return torch.repeat_interleave(counts, counts)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking),
            position_ids=self.position_ids.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> PackedBatch:
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.pin_memory(),
            cu_seqlens=self.cu_seqlens.pin_memory(),
            position_ids=self.position_ids.pin_memory(),
        )


def pack(sequences: Sequence[Sequence[int]]) -> PackedBatch:
    """Token id lists -> one PackedBatch (an empty list is an empty text: it pools to zeros)."""
    lengths = tuple(len(s) for s in sequences)
    flat = [t for s in sequences for t in s]
    return PackedBatch(
        input_ids=torch.tensor(flat, dtype=torch.long),
        cu_seqlens=torch.tensor((0, *lengths), dtype=torch.long).cumsum(0),
        position_ids=torch.tensor([p for n in lengths for p in range(n)], dtype=torch.long),
        lengths=lengths,
    )


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedBatch:
    """A padded batch (B, T), left or right padded, -> the PackedBatch of its real tokens (rows in order).

    On the device of the inputs; reads the mask's row sums once to the host."""
    real = attention_mask.bool()
    lengths = tuple(int(n) for n in real.sum(-1).tolist())
    counts = torch.as_tensor(lengths, dtype=torch.long, device=input_ids.device)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.long, device=input_ids.device)
    cu[1:] = counts.cumsum(0)
    # Real tokens in row order (boolean indexing keeps row-major order): left or right padding alike.
    positions = (real.long().cumsum(-1) - 1)[real]
    return PackedBatch(input_ids=input_ids[real], cu_seqlens=cu, position_ids=positions, lengths=lengths)
