"""The contrastive objective: (query, positive, hard negatives) rows -> InfoNCE (bidir_train.loss).

Data. Every epoch draws a fresh permutation of the examples, and for each example one of its positives and
`num_negatives` of its hard negatives, from a RNG seeded by (seed, epoch): not always the first ones, yet the same
on every rank and after a resume. A step takes the next `global_batch_size` examples of the permutation; micro-batch
k of rank r is the contiguous block [(k * W + r) * m, (k * W + r + 1) * m) of the step's rows (m = micro batch size,
W = world size), so a micro-batch group (m x W rows, the in-batch negatives) is the same rows whatever W is.
The data position of a run is just (epoch, step in epoch): nothing else to save for a resume.

Step: forward + backward of one micro-batch, plain or with GradCache. Plain: embed the queries and the passages, loss, backward. With `forward_chunk`, each side is embedded in
length-sorted chunks, each padded only to its own longest text: the same embeddings (attention never reads padding)
for much less compute when lengths vary (2.6x fewer padded tokens on the SNLI + MRPC + STS-B mixture). With
`max_tokens` (schedule.packing packed, the CPU default: schedule.max_tokens_per_forward), each forward is a packed batch (bidir_core.packed) of at most that
many real tokens: no padding at all, the same embeddings again. The micro-batch, and so the loss and its in-batch
negatives, is the same rows either way.

GradCache (Gao et al., 2021): the contrastive loss couples every query with every passage, so the batch cannot
simply be split. Instead (1) embed everything without autograd, `cache_chunk` texts at a time; (2) compute the loss
on those embeddings as leaves and backward to get d loss / d embedding; (3) re-embed each chunk with autograd and
backward the cached embedding gradient through it, each chunk from the random state its forward in (1) started
from. The parameter gradients equal the plain loss's, while only one chunk's activations are alive at a time; with
dropout (lora.dropout), the replayed state makes (3) draw the masks (1) drew, so they are the gradients of the loss
(1) and (2) computed, as a step without the cache and forward_chunk = cache_chunk computes it (same masks, same
random stream after the step).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from bidir_core.batching import pad_batch
from bidir_core.datasets import read_training_examples
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.packed import PackedBatch
from bidir_core.tokenization import tokenize
from bidir_train.config import TrainConfig
from bidir_train.loss import doc_key, info_nce
from bidir_train.objective import first_rows, input_chunks, packed_tokens, warn_left_out


class Contrastive:
    """The objective bidir_train.trainer runs for `objective: contrastive` (see bidir_train.objective)."""

    @classmethod
    def sampler(cls, cfg: TrainConfig) -> EpochSampler:
        if cfg.data.text_fields:
            raise BidirError("data.text_fields is for objective: mntp (contrastive rows have fixed fields)")
        return EpochSampler(
            first_rows(read_training_examples(cfg.data.train), cfg),
            global_batch_size=cfg.schedule.global_batch_size,
            num_negatives=cfg.data.num_negatives,
            seed=cfg.schedule.seed,
            where=cfg.data.train,
        )

    def __init__(self, cfg: TrainConfig, encoder: BiEncoder, device: torch.device):
        self.cfg, self.encoder, self.device = cfg, encoder, device
        self.collate = Collator(
            encoder.tokenizer,
            query_prefix=cfg.model.query_prefix,
            passage_prefix=cfg.model.passage_prefix,
            query_max=cfg.model.query_max_length,
            passage_max=cfg.model.passage_max_length,
        )

    def forward_backward(self, batch: MicroBatch, *, scale: float = 1.0) -> float:
        return forward_backward(
            self.embed,
            self.loss,
            batch,
            scale=scale,
            cache_chunk=self.cfg.loss.cache_chunk_size,
            forward_chunk=self.cfg.schedule.forward_chunk_size,
            max_tokens=packed_tokens(self.cfg.schedule, self.device),
        )

    def embed(self, ids: torch.Tensor | PackedBatch, mask: torch.Tensor | None) -> torch.Tensor:
        """Raw (un-normalized) embeddings of a padded (ids, mask) or a packed (PackedBatch, None) chunk: info_nce
        normalizes after each Matryoshka truncation."""
        mask = None if mask is None else mask.to(self.device)
        return self.encoder(ids.to(self.device), mask, normalize=False)

    def loss(self, q: torch.Tensor, p: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
        cfg, mask = self.cfg.loss, self.cfg.loss.mask_false_negatives
        return info_nce(
            q,
            p,
            num_negatives=self.cfg.data.num_negatives,
            temperature=cfg.temperature,
            in_batch_negatives=cfg.in_batch_negatives,
            gather=cfg.gather_across_ranks,
            passage_keys=batch.passage_keys.to(self.device) if mask else None,
            positive_keys=batch.positive_keys.to(self.device) if mask else None,
            dims=cfg.matryoshka_dims,
        )


# ------------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Sample:
    """One query with the positive and hard negatives drawn for it this epoch."""

    query: str
    positive: str
    negatives: tuple[str, ...]
    passage_keys: tuple[int, ...]  # doc_key of the positive, then of each negative
    positive_keys: tuple[int, ...]  # doc_key of every positive of the example (false-negative masking)


@dataclass
class MicroBatch:
    """Tokenized micro-batch of one rank: queries (B, Tq) and passages (B * (1 + N), Tp), grouped by query."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    passage_ids: torch.Tensor
    passage_mask: torch.Tensor
    passage_keys: torch.Tensor  # (B * (1 + N),) int64
    positive_keys: torch.Tensor  # (B, K) int64, -1 padded
    tokens: int  # real (non-pad) tokens in the micro-batch
    truncated: int  # texts cut to their max length


def _key(doc_id: str, text: str) -> int:
    # Without an id, a passage's text is its identity: the same text is the same document.
    return doc_key(doc_id) if doc_id else doc_key("text:" + text)


class EpochSampler:
    """Examples -> the rows of (epoch, step) for one rank."""

    def __init__(
        self, examples: Sequence, *, global_batch_size: int, num_negatives: int, seed: int, where: str
    ):
        self.examples = list(examples)
        self.global_batch_size = global_batch_size
        self.num_negatives = num_negatives
        self.seed = seed
        if not self.examples:
            raise BidirError(f"{where}: no training examples")
        if len(self.examples) < global_batch_size:
            raise BidirError(
                f"{where}: {len(self.examples)} training examples, fewer than one global batch of "
                f"{global_batch_size} (lower schedule.global_batch_size)"
            )
        if num_negatives:
            bare = [ex for ex in self.examples if not ex.negatives]
            if bare:
                raise BidirError(
                    f"{bare[0].origin or where}: no hard negatives, but data.num_negatives={num_negatives} "
                    f"({len(bare)} such examples; set data.num_negatives=0 or add neg_doc)"
                )
        self.steps_per_epoch = len(self.examples) // global_batch_size
        self.unused_per_epoch = len(self.examples) - self.steps_per_epoch * global_batch_size
        self.short_of_negatives = sum(1 for ex in self.examples if 0 < len(ex.negatives) < num_negatives)
        self._epoch, self._order = None, None

    def _draw(self, epoch: int) -> list[Sample]:
        """The epoch's example order with its sampled positives and negatives."""
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        rows = []
        for i in order[: self.steps_per_epoch * self.global_batch_size]:
            ex = self.examples[i]
            p = rng.randrange(len(ex.positives))
            negs = self._negatives(rng, len(ex.negatives))
            pos_ids = ex.positive_ids or ("",) * len(ex.positives)
            neg_ids = ex.negative_ids or ("",) * len(ex.negatives)
            rows.append(
                Sample(
                    query=ex.query,
                    positive=ex.positives[p],
                    negatives=tuple(ex.negatives[j] for j in negs),
                    passage_keys=(_key(pos_ids[p], ex.positives[p]),)
                    + tuple(_key(neg_ids[j], ex.negatives[j]) for j in negs),
                    positive_keys=tuple(_key(d, t) for d, t in zip(pos_ids, ex.positives, strict=True)),
                )
            )
        return rows

    def _negatives(self, rng: random.Random, available: int) -> list[int]:
        n = self.num_negatives
        if n <= available:
            return rng.sample(range(available), n)
        # Fewer than asked for: every one of them, then repeats (counted in short_of_negatives).
        picks = []
        while len(picks) < n:
            picks += rng.sample(range(available), available)
        return picks[:n]

    def warn(self, full_epochs: bool = True) -> None:
        """Say (once) what an epoch leaves out or repeats, so nothing is dropped silently."""
        warn_left_out(self, full_epochs)
        if self.short_of_negatives:
            warnings.warn(
                f"{self.short_of_negatives} examples have fewer than data.num_negatives={self.num_negatives} "
                "hard negatives; theirs are repeated",
                stacklevel=2,
            )

    def rows(self, epoch: int, step: int) -> list[Sample]:
        """All global_batch_size rows of a step, in micro-batch-group order."""
        if self._epoch != epoch:
            self._epoch, self._order = epoch, self._draw(epoch)
        start = step * self.global_batch_size
        return self._order[start : start + self.global_batch_size]


class Collator:
    """Samples -> MicroBatch: prefixes, tokenization with counted truncation, right padding."""

    def __init__(
        self, tokenizer, *, query_prefix: str, passage_prefix: str, query_max: int, passage_max: int
    ):
        self.tokenizer = tokenizer
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        self.query_max, self.passage_max = query_max, passage_max

    def __call__(self, samples: list[Sample]) -> MicroBatch:
        queries = [self.query_prefix + s.query for s in samples]
        passages = [self.passage_prefix + t for s in samples for t in (s.positive, *s.negatives)]
        q_ids, q_cut = tokenize(self.tokenizer, queries, self.query_max)
        p_ids, p_cut = tokenize(self.tokenizer, passages, self.passage_max)
        pad = self.tokenizer.pad_token_id
        query_ids, query_mask = pad_batch(q_ids, pad)
        passage_ids, passage_mask = pad_batch(p_ids, pad)
        k = max(len(s.positive_keys) for s in samples)
        positive_keys = torch.full((len(samples), k), -1, dtype=torch.long)
        for i, s in enumerate(samples):
            positive_keys[i, : len(s.positive_keys)] = torch.tensor(s.positive_keys, dtype=torch.long)
        return MicroBatch(
            query_ids=query_ids,
            query_mask=query_mask,
            passage_ids=passage_ids,
            passage_mask=passage_mask,
            passage_keys=torch.tensor([k for s in samples for k in s.passage_keys], dtype=torch.long),
            positive_keys=positive_keys,
            tokens=int(query_mask.sum() + passage_mask.sum()),
            truncated=q_cut + p_cut,
        )


# ------------------------------------------------------------------------------------------------------ step


# (ids, mask) (n, T), or (PackedBatch of n texts, None) -> embeddings (n, D) fp32
Embed = Callable[[torch.Tensor | PackedBatch, torch.Tensor | None], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor, MicroBatch], torch.Tensor]  # (q, p, batch) -> scalar


def forward_backward(
    embed: Embed,
    loss_fn: Loss,
    batch: MicroBatch,
    *,
    scale: float = 1.0,
    cache_chunk: int | None = None,
    forward_chunk: int | None = None,
    max_tokens: int | None = None,
) -> float:
    """Backward `scale * loss` of the micro-batch into the parameters' .grad; return the (unscaled) loss.
    max_tokens: every forward is a packed batch of at most that many real tokens (and at most cache_chunk /
    forward_chunk texts when given), never padded; the loss and its gradients are the same."""
    sides = [(batch.query_ids, batch.query_mask), (batch.passage_ids, batch.passage_mask)]
    if cache_chunk is None:
        # (B, D), (B*(1+N), D)
        q, p = (embed_sorted(embed, ids, mask, forward_chunk, max_tokens) for ids, mask in sides)
        loss = loss_fn(q, p, batch)
        (loss * scale).backward()
        return loss.item()

    # Both passes embed the same chunks in the same order, and each chunk's second forward starts from the random
    # state its first forward started from: dropout (LoRA's, or any in the model) draws the same masks twice, so the
    # parameter gradients are those of the loss returned here. (Per process: each rank replays its own generator.)
    chunks = [list(input_chunks(ids, mask, cache_chunk, max_tokens)) for ids, mask in sides]
    states = [[], []]  # per side, the RandomState before each chunk's first forward
    with torch.no_grad():
        q, p = (_embed_chunks(embed, side, started) for side, started in zip(chunks, states, strict=True))
    q.requires_grad_(True)
    p.requires_grad_(True)
    loss = loss_fn(q, p, batch)
    (loss * scale).backward()  # only into q.grad, p.grad: no parameter is in this graph
    # After the step the stream is where the first pass and the loss left it, as after a step without the cache
    # (forward_chunk = cache_chunk): the replayed draws are not drawn twice.
    after = RandomState.now()
    try:
        for side, started, grad in zip(chunks, states, (q.grad, p.grad), strict=True):
            for (rows, inputs), state in zip(side, started, strict=True):
                state.restore()
                # d(sum(e * g)) / d params = g^T de/dparams: the chain rule through the cached embedding gradient.
                (embed(*inputs) * grad[rows]).sum().backward()
    finally:
        after.restore()
    return loss.item()


@dataclass(frozen=True)
class RandomState:
    """The generator state torch's random ops (dropout) draw from in this process: the CPU generator's and, once
    CUDA is in use, the current CUDA device's (the device a rank trains on: distributed.init_distributed sets it)."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @classmethod
    def now(cls) -> RandomState:
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def _embed_chunks(
    embed: Embed, chunks: Iterable[tuple[torch.Tensor, tuple]], started: list[RandomState] | None = None
) -> torch.Tensor:
    """input_chunks' (rows, inputs) chunks -> embeddings (n, D) in the batch's row order. `started`: each chunk's
    RandomState before its forward is appended to it."""
    parts, order = [], []
    for rows, inputs in chunks:
        if started is not None:
            started.append(RandomState.now())
        parts.append(embed(*inputs))
        order.append(rows)
    inverse = torch.argsort(torch.cat(order))  # row r of the batch is row inverse[r] of the concatenation
    return torch.cat(parts)[inverse]


def embed_sorted(
    embed: Embed, ids: torch.Tensor, mask: torch.Tensor, chunk: int | None, max_tokens: int | None = None
) -> torch.Tensor:
    """embed(ids, mask) (n, D), computed `chunk` length-sorted rows at a time (None: in one forward), or in
    packed chunks of at most max_tokens real tokens (and `chunk` rows) when max_tokens is given."""
    if max_tokens is None and (chunk is None or chunk >= ids.shape[0]):
        return embed(ids, mask)
    return _embed_chunks(embed, input_chunks(ids, mask, chunk, max_tokens))
