"""Forward + backward of one micro-batch, plain or with GradCache.

Plain: embed the queries and the passages, loss, backward. With `forward_chunk`, each side is embedded in
length-sorted chunks, each padded only to its own longest text: the same embeddings (attention never reads padding)
for much less compute when lengths vary (2.6x fewer padded tokens on the SNLI + MRPC + STS-B mixture).

GradCache (Gao et al., 2021): the contrastive loss couples every query with every passage, so the batch cannot
simply be split. Instead (1) embed everything without autograd, `cache_chunk` texts at a time; (2) compute the loss
on those embeddings as leaves and backward to get d loss / d embedding; (3) re-embed each chunk with autograd and
backward the cached embedding gradient through it. The parameter gradients equal the plain loss's, while only one
chunk's activations are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from bidir_train.data import MicroBatch

Embed = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) (n, T) -> embeddings (n, D) fp32
Loss = Callable[[torch.Tensor, torch.Tensor, MicroBatch], torch.Tensor]  # (q, p, batch) -> scalar


def forward_backward(
    embed: Embed,
    loss_fn: Loss,
    batch: MicroBatch,
    *,
    scale: float = 1.0,
    cache_chunk: int | None = None,
    forward_chunk: int | None = None,
) -> float:
    """Backward `scale * loss` of the micro-batch into the parameters' .grad; return the (unscaled) loss."""
    sides = [(batch.query_ids, batch.query_mask), (batch.passage_ids, batch.passage_mask)]
    if cache_chunk is None:
        q, p = (embed_sorted(embed, ids, mask, forward_chunk) for ids, mask in sides)  # (B, D), (B*(1+N), D)
        loss = loss_fn(q, p, batch)
        (loss * scale).backward()
        return loss.item()

    with torch.no_grad():
        q, p = (embed_sorted(embed, ids, mask, cache_chunk) for ids, mask in sides)
    q.requires_grad_(True)
    p.requires_grad_(True)
    loss = loss_fn(q, p, batch)
    (loss * scale).backward()  # only into q.grad, p.grad: no parameter is in this graph
    for (ids, mask), grad in zip(sides, (q.grad, p.grad), strict=True):
        for rows, i, m in sorted_chunks(mask, cache_chunk, ids):
            # d(sum(e * g)) / d params = g^T de/dparams: the chain rule through the cached embedding gradient.
            (embed(i, m) * grad[rows]).sum().backward()
    return loss.item()


def embed_sorted(embed: Embed, ids: torch.Tensor, mask: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """embed(ids, mask) (n, D), computed `chunk` length-sorted rows at a time (None: in one forward)."""
    if chunk is None or chunk >= ids.shape[0]:
        return embed(ids, mask)
    parts, order = [], []
    for rows, i, m in sorted_chunks(mask, chunk, ids):
        parts.append(embed(i, m))
        order.append(rows)
    inverse = torch.argsort(torch.cat(order))  # row r of the batch is row inverse[r] of the concatenation
    return torch.cat(parts)[inverse]


def sorted_chunks(
    mask: torch.Tensor, size: int, *tensors: torch.Tensor
) -> Iterator[tuple[torch.Tensor, ...]]:
    """(rows, *tensors[rows], mask[rows]) per chunk of `size` rows, longest rows first, each trimmed to its own
    longest row (right padding), so a chunk of short texts does not pay for the batch's longest one."""
    lengths = mask.sum(-1)  # (n,)
    order = torch.argsort(lengths, descending=True, stable=True)
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        width = max(int(lengths[rows].max()), 1)
        yield (rows, *(t[rows, :width] for t in tensors), mask[rows, :width])
