"""Forward + backward of one micro-batch, plain or with GradCache.

Plain: embed the queries (one forward) and the passages (one forward), loss, backward.

GradCache (Gao et al., 2021): the contrastive loss couples every query with every passage, so the batch cannot
simply be split. Instead (1) embed everything without autograd, `chunk` texts at a time; (2) compute the loss on
those embeddings as leaves and backward to get d loss / d embedding; (3) re-embed each chunk with autograd and
backward the cached embedding gradient through it. The parameter gradients equal the plain loss's, while only one
chunk's activations are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bidir_train.data import MicroBatch

Embed = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) (n, T) -> embeddings (n, D) fp32
Loss = Callable[[torch.Tensor, torch.Tensor, MicroBatch], torch.Tensor]  # (q, p, batch) -> scalar


def forward_backward(
    embed: Embed, loss_fn: Loss, batch: MicroBatch, *, scale: float = 1.0, chunk: int | None = None
) -> float:
    """Backward `scale * loss` of the micro-batch into the parameters' .grad; return the (unscaled) loss."""
    if chunk is None:
        q = embed(batch.query_ids, batch.query_mask)  # (B, D)
        p = embed(batch.passage_ids, batch.passage_mask)  # (B * (1 + N), D)
        loss = loss_fn(q, p, batch)
        (loss * scale).backward()
        return loss.item()

    sides = [(batch.query_ids, batch.query_mask), (batch.passage_ids, batch.passage_mask)]
    with torch.no_grad():
        q, p = (torch.cat([embed(i, m) for i, m in _chunks(ids, mask, chunk)]) for ids, mask in sides)
    q.requires_grad_(True)
    p.requires_grad_(True)
    loss = loss_fn(q, p, batch)
    (loss * scale).backward()  # only into q.grad, p.grad: no parameter is in this graph
    for (ids, mask), grad in zip(sides, (q.grad, p.grad), strict=True):
        for (i, m), g in zip(_chunks(ids, mask, chunk), grad.split(chunk), strict=True):
            # d(sum(e * g)) / d params = g^T de/dparams: the chain rule through the cached embedding gradient.
            (embed(i, m) * g).sum().backward()
    return loss.item()


def _chunks(ids: torch.Tensor, mask: torch.Tensor, size: int):
    for start in range(0, ids.shape[0], size):
        i, m = ids[start : start + size], mask[start : start + size]
        # Trim the chunk's own padding: a chunk of short texts should not pay for the batch's longest one.
        width = max(int(m.sum(-1).max()), 1)
        yield i[:, :width], m[:, :width]
