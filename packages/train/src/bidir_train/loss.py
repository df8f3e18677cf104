"""The contrastive (InfoNCE) loss: each query against its positive, its hard negatives, the other queries'
passages in the micro-batch, and optionally the passages of every other rank.

Layout. A rank holds B queries and B * (1 + N) passages grouped by query: row i's positive is passage
i * (1 + N), its N hard negatives follow it. With gathering, the candidate passages are the concatenation over
ranks (rank 0's first), so query i of rank r has its positive at column (r * B + i) * (1 + N).

Shapes: q (B, D), p (B * (1 + N), D); scores (B, C) with C = W * B * (1 + N) (gathered), B * (1 + N) (in-batch)
or 1 + N (own passages only).

Also CoSENT, the score-aware loss on graded pairs (sentence1, sentence2, gold score) that objective: cosent
(bidir_train.cosent) trains with.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bidir_core.errors import BidirError


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank the gradient of the *sum of all ranks' losses*
    with respect to its own rows (all_reduce of the full gradient, then this rank's slice). All-reduce rather
    than reduce-scatter because gloo has no reduce-scatter; embeddings are small, so the cost is too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each of W ranks -> (W * n, ...), differentiable; the identity without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """Non-differentiable all_gather of an integer tensor along dim 0."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ids
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts)


def doc_key(doc_id: str) -> int:
    """A document id (or a passage's text) as a stable 63-bit integer, so ids can be compared on any rank."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def info_nce(
    q: torch.Tensor,
    p: torch.Tensor,
    *,
    num_negatives: int,
    temperature: float = 0.02,
    in_batch_negatives: bool = True,
    gather: bool = False,
    passage_keys: torch.Tensor | None = None,
    positive_keys: torch.Tensor | None = None,
    dims: tuple[int, ...] = (),
) -> torch.Tensor:
    """Mean cross-entropy over this rank's queries (scalar).

    q (B, D), p (B * (1 + num_negatives), D): raw embeddings (L2-normalized here, after Matryoshka truncation).
    gather: score against every rank's passages (needs the same B on every rank; call it on every rank).
    passage_keys (B * (1 + N),) int64: a document key per passage (doc_key); positive_keys (B, K) int64: the keys
    of every positive of each query, padded with -1. A candidate whose key is one of the query's positive keys,
    other than the labelled positive itself, is a false negative and is masked out of the softmax.
    dims: Matryoshka; the loss is averaged over these truncations (empty: the full dimension).
    """
    group = 1 + num_negatives
    B = q.shape[0]
    if p.shape[0] != B * group:
        raise BidirError(f"{p.shape[0]} passages for {B} queries with {num_negatives} negatives each")
    losses = []
    for dim in dims or (q.shape[1],):
        if dim > q.shape[1]:
            raise BidirError(f"loss.matryoshka_dims: {dim} is larger than the embedding size {q.shape[1]}")
        qd = F.normalize(q[:, :dim], dim=-1)
        pd = F.normalize(p[:, :dim], dim=-1)
        logits, labels, mask = _scores(qd, pd, group, in_batch_negatives, gather, passage_keys, positive_keys)
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        losses.append(F.cross_entropy(logits / temperature, labels))
    return torch.stack(losses).mean()


def _scores(q, p, group, in_batch, gather, passage_keys, positive_keys):
    """(logits (B, C), labels (B,), false-negative mask (B, C) or None)."""
    B = q.shape[0]
    if not in_batch:
        # Own passages only: (B, 1, D) x (B, group, D) -> (B, group); the positive is column 0.
        logits = torch.einsum("bd,bgd->bg", q, p.view(B, group, -1))
        labels = torch.zeros(B, dtype=torch.long, device=q.device)
        cand_keys = passage_keys.view(B, group) if passage_keys is not None else None
    else:
        offset = 0
        if gather and dist.is_initialized() and dist.get_world_size() > 1:
            offset = dist.get_rank() * B * group  # this rank's block in the gathered passages
            p = gather_with_grad(p)
            passage_keys = gather_ids(passage_keys) if passage_keys is not None else None
        logits = q @ p.T  # (B, C)
        labels = offset + torch.arange(B, device=q.device) * group
        cand_keys = passage_keys[None, :].expand(B, -1) if passage_keys is not None else None
    if cand_keys is None or positive_keys is None:
        return logits, labels, None
    # (B, C, K) -> (B, C): the candidate is one of the query's positives...
    same = (cand_keys[:, :, None] == positive_keys[:, None, :]).any(-1)
    # ...and is not the labelled column itself.
    same[torch.arange(B, device=q.device), labels if in_batch else 0] = False
    return logits, labels, same


def cosent(
    a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor, *, scale: float = 20.0, dims: tuple[int, ...] = ()
) -> torch.Tensor:
    """CoSENT (Su, 2022; the ranking term of AnglE): every pair of pairs whose gold scores are ordered should have
    its cosines ordered the same way. With s_i = cos(a_i, b_i) and y_i the gold score of pair i,

        loss = log(1 + sum over (i, j) with y_i > y_j of exp(scale * (s_j - s_i)))

    a, b (P, D): raw embeddings of the two sides (L2-normalized here, after Matryoshka truncation); scores (P,): the
    gold similarity of each pair (any scale: only their order counts). A micro-batch whose scores are all equal has
    no ordered pair: its loss is log(1) = 0. dims: averaged over these truncations (empty: the full dimension).
    """
    if a.shape != b.shape or scores.shape != (a.shape[0],):
        raise BidirError(
            f"cosent: {tuple(a.shape)} and {tuple(b.shape)} embeddings for {tuple(scores.shape)} scores"
        )
    losses = []
    for dim in dims or (a.shape[1],):
        if dim > a.shape[1]:
            raise BidirError(f"loss.matryoshka_dims: {dim} is larger than the embedding size {a.shape[1]}")
        s = (F.normalize(a[:, :dim], dim=-1) * F.normalize(b[:, :dim], dim=-1)).sum(-1) * scale  # (P,)
        diff = s[None, :] - s[:, None]  # (P, P): [i, j] = scale * (s_j - s_i)
        ordered = scores[:, None] > scores[None, :]  # (P, P): pair i should score above pair j
        # The leading 0 is the "1 +" inside the log; logsumexp keeps exp(scale * ...) from overflowing.
        terms = torch.cat([diff.new_zeros(1), diff[ordered]])
        losses.append(torch.logsumexp(terms, dim=0))
    return torch.stack(losses).mean()
