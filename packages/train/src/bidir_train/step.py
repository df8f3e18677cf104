"""The step of an objective that embeds (or scores) groups of texts and computes one loss over them: forward +
backward of one micro-batch, plain, in length-sorted chunks, packed, or with GradCache. bidir_train.contrastive
(queries, passages -> InfoNCE) and bidir_train.cosent (sentence1, sentence2 -> CoSENT) call it; it knows no
objective: a micro-batch is its groups of (ids, mask) rows, an Embed function and a loss over the embedded groups.

Plain: embed every group, loss, backward. With `forward_chunk`, each group is embedded in length-sorted chunks,
each padded only to its own longest text: the same embeddings (attention never reads padding) for much less compute
when lengths vary (2.6x fewer padded tokens on the SNLI + MRPC + STS-B mixture). With `max_tokens`
(schedule.packing packed, the CPU default: schedule.max_tokens_per_forward), each forward is a packed batch
(bidir_core.packed) of at most that many real tokens: no padding at all, the same embeddings again. The
micro-batch, and so the loss (and a contrastive loss's in-batch negatives), is the same rows either way.

GradCache (Gao et al., 2021): a loss that couples every row with every other (InfoNCE's in-batch negatives,
CoSENT's ranking over all pairs) cannot simply be split. Instead (1) embed everything without autograd,
`cache_chunk` texts at a time; (2) compute the loss on those embeddings as leaves and backward to get
d loss / d embedding; (3) re-embed each chunk with autograd and backward the cached embedding gradient through it,
each chunk from the random state its forward in (1) started from. The parameter gradients equal the plain loss's,
while only one chunk's activations are alive at a time; with dropout (lora.dropout), the replayed state makes (3)
draw the masks (1) drew, so they are the gradients of the loss (1) and (2) computed, as a step without the cache
and forward_chunk = cache_chunk computes it (same masks, same random stream after the step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from bidir_core.batching import length_sorted_batches
from bidir_core.encoder import BiEncoder
from bidir_core.packed import PackedBatch, pack_padded
from bidir_train.config import ScheduleConfig, TrainConfig

# (ids, mask) (n, T), or (PackedBatch of n texts, None) -> one row per text (n, ...) fp32: embeddings (n, D), or a
# reranker's scores (n,)
Embed = Callable[[torch.Tensor | PackedBatch, torch.Tensor | None], torch.Tensor]
# The embedded groups, in the order given (e.g. queries (B, D), passages (B * (1 + N), D)) -> a scalar loss
GroupLoss = Callable[..., torch.Tensor]
# One group of a micro-batch: right-padded ids (n, T) int64 and attention mask (n, T)
Group = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Chunking:
    """How a micro-batch's texts are cut into forwards: cache_chunk (loss.cache_chunk_size: GradCache, texts per
    chunk), forward_chunk (schedule.forward_chunk_size: length-sorted chunks) and max_tokens (real tokens per packed
    forward; None: padded forwards). None everywhere: one padded forward per group."""

    cache_chunk: int | None = None
    forward_chunk: int | None = None
    max_tokens: int | None = None

    @classmethod
    def from_recipe(cls, cfg: TrainConfig, device: torch.device) -> Chunking:
        """The recipe's chunking on `device`; every objective that calls forward_backward takes it from here."""
        return cls(
            cfg.loss.cache_chunk_size, cfg.schedule.forward_chunk_size, packed_tokens(cfg.schedule, device)
        )


@dataclass(frozen=True)
class EncoderEmbed:
    """The Embed of an encoder: raw (un-normalized) embeddings (n, D) of a padded or packed chunk, moved to `device`
    (the losses normalize after each Matryoshka truncation)."""

    encoder: BiEncoder
    device: torch.device

    def __call__(self, ids: torch.Tensor | PackedBatch, mask: torch.Tensor | None) -> torch.Tensor:
        mask = None if mask is None else mask.to(self.device)
        return self.encoder(ids.to(self.device), mask, normalize=False)


def forward_backward(
    embed: Embed,
    loss_fn: GroupLoss,
    groups: Sequence[Group],
    *,
    scale: float = 1.0,
    chunking: Chunking = Chunking(),
) -> float:
    """Backward `scale * loss_fn(*embedded groups)` into the parameters' .grad; return the (unscaled) loss. With
    chunking.max_tokens every forward is a packed batch of at most that many real tokens (and at most cache_chunk /
    forward_chunk texts when given), never padded; the loss and its gradients are the same."""
    if chunking.cache_chunk is None:
        embedded = [
            embed_sorted(embed, ids, mask, chunking.forward_chunk, chunking.max_tokens)
            for ids, mask in groups
        ]
        loss = loss_fn(*embedded)
        (loss * scale).backward()
        return loss.item()

    # Both passes embed the same chunks in the same order, and each chunk's second forward starts from the random
    # state its first forward started from: dropout (LoRA's, or any in the model) draws the same masks twice, so the
    # parameter gradients are those of the loss returned here. (Per process: each rank replays its own generator.)
    chunks = [
        list(input_chunks(ids, mask, chunking.cache_chunk, chunking.max_tokens)) for ids, mask in groups
    ]
    states = [[] for _ in groups]  # per group, the RandomState before each chunk's first forward
    with torch.no_grad():
        embedded = [
            _embed_chunks(embed, group, started) for group, started in zip(chunks, states, strict=True)
        ]
    for e in embedded:
        e.requires_grad_(True)
    loss = loss_fn(*embedded)
    (loss * scale).backward()  # only into the embeddings' .grad: no parameter is in this graph
    # After the step the stream is where the first pass and the loss left it, as after a step without the cache
    # (forward_chunk = cache_chunk): the replayed draws are not drawn twice.
    after = RandomState.now()
    try:
        for group, started, grad in zip(chunks, states, (e.grad for e in embedded), strict=True):
            for (rows, inputs), state in zip(group, started, strict=True):
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
    """input_chunks' (rows, inputs) chunks -> embeddings (n, ...) in the group's row order. `started`: each chunk's
    RandomState before its forward is appended to it."""
    parts, order = [], []
    for rows, inputs in chunks:
        if started is not None:
            started.append(RandomState.now())
        parts.append(embed(*inputs))
        order.append(rows)
    inverse = torch.argsort(torch.cat(order))  # row r of the group is row inverse[r] of the concatenation
    return torch.cat(parts)[inverse]


def embed_sorted(
    embed: Embed, ids: torch.Tensor, mask: torch.Tensor, chunk: int | None, max_tokens: int | None = None
) -> torch.Tensor:
    """embed(ids, mask) (n, ...), computed `chunk` length-sorted rows at a time (None: in one forward), or in
    packed chunks of at most max_tokens real tokens (and `chunk` rows) when max_tokens is given."""
    if max_tokens is None and (chunk is None or chunk >= ids.shape[0]):
        return embed(ids, mask)
    return _embed_chunks(embed, input_chunks(ids, mask, chunk, max_tokens))


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


def input_chunks(
    ids: torch.Tensor, mask: torch.Tensor, rows: int | None, max_tokens: int | None
) -> Iterator[tuple[torch.Tensor, tuple]]:
    """(row indices, model inputs) per chunk, longest rows first. With max_tokens: each chunk is one PackedBatch of
    at most max_tokens real tokens (and `rows` rows, when given), inputs (packed, None): no padding at all. Else
    sorted_chunks of `rows` rows (all of them: None), inputs (ids, mask) each trimmed to its chunk's longest row."""
    if max_tokens is None:
        for chunk_rows, i, m in sorted_chunks(mask, rows or ids.shape[0], ids):
            yield chunk_rows, (i, m)
        return
    lengths = mask.sum(-1).tolist()
    for chunk in length_sorted_batches(lengths, rows or len(lengths), max_tokens, padded=False):
        chunk_rows = torch.tensor(chunk, dtype=torch.long)
        yield chunk_rows, (pack_padded(ids[chunk_rows], mask[chunk_rows]), None)


def packed_tokens(schedule: ScheduleConfig, device: torch.device) -> int | None:
    """The real-token budget of a packed forward, or None for padded forwards (schedule.packing; auto: packed on
    CPU, padded on CUDA)."""
    packing = schedule.packing
    if packing == "auto":
        packing = "padded" if device.type == "cuda" else "packed"
    return schedule.max_tokens_per_forward if packing == "packed" else None
