"""What the training loop needs from an objective, and the pieces the objectives share.

An objective (bidir_train.contrastive, bidir_train.mntp, bidir_train.cosent, bidir_train.reranker) is a class with
- `sampler(cfg)`, called before the model loads: the run's data as a Sampler, which hands out the rows of
  (epoch, step in epoch) deterministically, so the data position of a run is just those two numbers;
- `__init__(cfg, encoder, device)`, once the model is loaded and sharded (a BiEncoder; for the reranker a
  CrossEncoder, bidir_train.weights.load_model);
- `collate(rows)`: one rank's rows -> a tokenized micro-batch;
- `forward_backward(batch, scale=...)`: backward `scale * loss` of the micro-batch into the parameters' .grad and
  return the (unscaled) loss.
The loop (bidir_train.trainer) picks one by the recipe's `objective` and knows nothing else about it. An objective
that embeds (or scores) groups of texts and computes one loss over them (contrastive, cosent, reranker) runs its
forward_backward through bidir_train.step, which also cuts MNTP's forwards into chunks.
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Iterable
from typing import Protocol

import torch
import torch.distributed as dist

from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_train.config import TrainConfig


class Sampler(Protocol):
    examples: list
    steps_per_epoch: int
    unused_per_epoch: int

    def rows(self, epoch: int, step: int) -> list:
        """All global_batch_size rows of a step, in micro-batch-group order (the same on every rank)."""
        ...

    def warn(self, full_epochs: bool) -> None:
        """Say (once, rank 0) what an epoch leaves out or repeats."""
        ...


class Batch(Protocol):
    tokens: int  # real (non-pad) tokens in the micro-batch
    truncated: int  # texts cut to their max length


class Objective(Protocol):
    @classmethod
    def sampler(cls, cfg: TrainConfig) -> Sampler: ...

    def __init__(self, cfg: TrainConfig, encoder: BiEncoder, device: torch.device): ...

    def collate(self, rows: list) -> Batch: ...

    def forward_backward(self, batch: Batch, *, scale: float = 1.0) -> float: ...


def first_rows(rows: Iterable, cfg: TrainConfig) -> list:
    """The first data.max_examples rows (all: None), at least one and at least one per rank."""
    where, world = cfg.data.train, dist.get_world_size()
    rows = list(itertools.islice(rows, cfg.data.max_examples))
    if not rows:
        raise BidirError(f"{where}: no training examples")
    if world > len(rows):
        raise BidirError(f"{where}: {len(rows)} examples for {world} ranks: more ranks than rows")
    return rows


def rank_micro_batches(rows: list, micro: int, rank: int, world: int) -> list[list]:
    """The micro-batches of this rank: block (k * world + rank) of `micro` rows, for k = 0, 1, ... So a micro-batch
    group (micro x world rows, the in-batch negatives) is the same rows whatever the world size."""
    groups = len(rows) // (micro * world)
    return [rows[(k * world + rank) * micro : (k * world + rank + 1) * micro] for k in range(groups)]


class ShuffledSampler:
    """Examples -> the rows of (epoch, step): a fresh seeded permutation per epoch, global_batch_size rows a step,
    the last len(examples) % global_batch_size of the permutation left out. (MNTP's texts and CoSENT's graded pairs
    as they are; the contrastive objective's examples with the positive and negatives it draws for each; `noun`
    names the examples in the error.)"""

    noun = "examples"

    def __init__(self, examples: Iterable, *, global_batch_size: int, seed: int, where: str):
        self.examples = list(examples)
        self.global_batch_size = global_batch_size
        self.seed = seed
        if len(self.examples) < global_batch_size:
            raise BidirError(
                f"{where}: {len(self.examples)} {self.noun}, fewer than one global batch of {global_batch_size} "
                "(lower schedule.global_batch_size)"
            )
        self.steps_per_epoch = len(self.examples) // global_batch_size
        self.unused_per_epoch = len(self.examples) - self.steps_per_epoch * global_batch_size
        self._epoch, self._rows = None, None

    def warn(self, full_epochs: bool = True) -> None:
        warn_left_out(self, full_epochs)

    def permutation(self, epoch: int) -> tuple[list[int], random.Random]:
        """The epoch's order of the examples (indices into self.examples), the same on every rank and after a
        resume, and the generator, seeded by (seed, epoch), that drew it: what it draws next is the epoch's too."""
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        return order, rng

    def draw(self, epoch: int) -> list:
        """The epoch's rows in step order: the permutation's first steps_per_epoch * global_batch_size examples."""
        order, _ = self.permutation(epoch)
        return [self.examples[i] for i in order[: self.steps_per_epoch * self.global_batch_size]]

    def rows(self, epoch: int, step: int) -> list:
        """All global_batch_size rows of a step, in micro-batch-group order (each epoch drawn once)."""
        if self._epoch != epoch:
            self._epoch, self._rows = epoch, self.draw(epoch)
        start = step * self.global_batch_size
        return self._rows[start : start + self.global_batch_size]


def warn_left_out(sampler: Sampler, full_epochs: bool) -> None:
    """The rows that do not fill a global batch, so none is dropped silently. (A run shorter than an epoch never
    reaches the remainder: nothing to say about it then.)"""
    if sampler.unused_per_epoch and full_epochs:
        warnings.warn(
            f"{sampler.unused_per_epoch} of {len(sampler.examples)} examples do not fill a global batch and are "
            "left out of each epoch (a different random set each epoch)",
            stacklevel=3,
        )
