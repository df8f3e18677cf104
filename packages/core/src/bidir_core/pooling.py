"""Pooling token states into one vector per text. Every strategy reads real tokens only and is correct for left and
right padding alike (it looks at the mask, never at an assumed padding side).

Shapes: hidden (B, T, H), attention_mask (B, T) with 1 for real tokens -> (B, H); pool_packed: a packed batch's
hidden (N, H) -> (B, H), per text (bidir_core.packed).
"""

from __future__ import annotations

import torch

from bidir_core.errors import BidirError
from bidir_core.packed import PackedBatch

POOLING_STRATEGIES = ("avg", "cls", "last", "weighted_avg")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, strategy: str = "avg") -> torch.Tensor:
    """Pool (B, T, H) hidden states to (B, H) with one of POOLING_STRATEGIES.

    avg: mean of real tokens. cls: the first real token. last: the last real token of each row.
    weighted_avg: mean weighted by position among the real tokens, 1..n (SGPT), so later tokens, which have seen
    more of the text in a causal model, weigh more; weights sum to 1.
    A row with no real token pools to zeros.
    """
    check_pooling(strategy)
    mask = attention_mask.to(hidden.dtype)  # (B, T)
    if strategy == "avg":
        return _weighted_mean(hidden, mask)
    if strategy == "weighted_avg":
        positions = attention_mask.long().cumsum(-1).to(hidden.dtype)  # 1..n over real tokens
        return _weighted_mean(hidden, positions * mask)
    index = _first_real(attention_mask) if strategy == "cls" else _last_real(attention_mask)
    return _gather(hidden, index) * mask.amax(-1, keepdim=True)  # x0 for an all-pad row


def check_pooling(strategy: str) -> None:
    if strategy not in POOLING_STRATEGIES:
        raise BidirError(f"unknown pooling {strategy!r}: choose one of {', '.join(POOLING_STRATEGIES)}")


def _weighted_mean(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    total = weights.sum(-1, keepdim=True).clamp(min=1e-9)  # (B, 1); an all-pad row gives 0 / eps = 0
    return torch.einsum("bth,bt->bh", hidden, weights) / total


def _first_real(attention_mask: torch.Tensor) -> torch.Tensor:
    # argmax returns the first maximal index: the first 1 in the row (0 for an all-pad row). Float, because
    # exporters do not all take an integer argmax.
    return attention_mask.float().argmax(-1)  # (B,)


def _last_real(attention_mask: torch.Tensor) -> torch.Tensor:
    T = attention_mask.shape[-1]
    # Flip, find the first 1, map back: the last 1 whatever the padding side.
    return (T - 1 - attention_mask.float().flip(-1).argmax(-1)).clamp(min=0)  # (B,)


def _gather(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def pool_packed(hidden: torch.Tensor, packed: PackedBatch, strategy: str = "avg") -> torch.Tensor:
    """Pool a packed batch's (N, H) hidden states to (B, H), text by text, with the same strategies as pool():
    the embedding of each text equals pool() of its row in a padded batch. An empty text pools to zeros."""
    check_pooling(strategy)
    B, H = packed.num_texts, hidden.shape[-1]
    if packed.num_tokens == 0:
        return hidden.new_zeros(B, H)
    lengths = torch.as_tensor(packed.lengths, device=hidden.device)  # (B,)
    if strategy in ("avg", "weighted_avg"):
        seg = packed.segment_ids().to(hidden.device)  # (N,)
        # avg: weight 1 per token; weighted_avg: its position 1..n within its text.
        weights = (
            packed.position_ids.to(hidden.device, hidden.dtype) + 1 if strategy == "weighted_avg" else None
        )
        weights = torch.ones_like(hidden[:, 0]) if weights is None else weights  # (N,)
        sums = hidden.new_zeros(B, H).index_add_(0, seg, hidden * weights[:, None])
        total = hidden.new_zeros(B).index_add_(0, seg, weights).clamp(min=1e-9)
        return sums / total[:, None]
    cu = packed.cu_seqlens.to(hidden.device)
    last = packed.num_tokens - 1
    # cls: a text's first token; last: its last one. An empty text's index points elsewhere: zeroed below.
    index = cu[:-1].clamp(max=last) if strategy == "cls" else (cu[1:] - 1).clamp(min=0)
    return hidden[index] * (lengths > 0).to(hidden.dtype)[:, None]
