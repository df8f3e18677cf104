"""The reranker objective (`objective: reranker`): a cross-encoder (bidir_core.CrossEncoder) learns to score each
query's positive above its hard negatives, from the contrastive objective's rows (query, pos_doc, neg_doc).

Data. The contrastive objective's EpochSampler: each epoch a fresh seeded permutation, and for each query one of
its positives and data.num_negatives of its neg_doc, drawn from (seed, epoch): the same on every rank and after a
resume. A query's group is those G = 1 + data.num_negatives pairs, positive first; there are no in-batch negatives
(a cross-encoder scores pairs, and another query's passage is an easy negative). A row with fewer neg_doc than
data.num_negatives has its negatives repeated (counted in one warning, as for the contrastive objective), so every
group has G pairs. A row with none (bidir-mine's margin filter can leave a row so) is left out of the sampler, counted
in one warning naming the first: a group of its positive alone has a constant loss and nothing to learn. Only a file
with no row left is refused.

Step. Each pair is formatted with the model's template (rerank.template), tokenized at rerank.max_length, and
bidir_train.step scores the micro-batch's B * G pairs as one group of texts with a score function returning
(n, 1) logits: packed forwards (schedule.packing), length-sorted chunks and GradCache (loss.cache_chunk_size) work
as for the embedders, with the same gradients. The loss (rerank.loss, bidir_train.rerank_loss) is over each
query's group; the distillation losses read the rows' teacher scores (pos_score / neg_scores), and rows (of those
with negatives) without them are refused before the model loads.

The dev evaluation (eval.dev) scores embedders only: a reranker recipe sets eval.dev=null, and final/ is scored
with bidir-eval afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from bidir_core.batching import pad_batch
from bidir_core.datasets import TrainingExample, read_training_examples
from bidir_core.errors import BidirError
from bidir_core.packed import PackedBatch
from bidir_train.config import TrainConfig
from bidir_train.contrastive import EpochSampler, Sample, require_teacher_scores, teacher_scores
from bidir_train.objective import first_rows
from bidir_train.rerank_loss import DISTILL_LOSSES, rerank_loss
from bidir_train.step import Chunking, Group, forward_backward


@dataclass(frozen=True)
class PairBatch:
    """One rank's micro-batch of B queries as B * G (query, passage) pairs (n, T), right padded, grouped by query
    with the positive first."""

    ids: torch.Tensor
    mask: torch.Tensor
    teacher_scores: torch.Tensor | None  # (B * G,) float32, or None when the rows have none
    tokens: int  # real (non-pad) tokens in the micro-batch
    truncated: int  # pairs cut to rerank.max_length

    @property
    def groups(self) -> tuple[Group]:
        """What bidir_train.step scores: every pair, as one group of texts."""
        return ((self.ids, self.mask),)


class Reranker:
    """The objective bidir_train.trainer runs for `objective: reranker` (see bidir_train.objective); `model` is a
    bidir_core.CrossEncoder."""

    @classmethod
    def sampler(cls, cfg: TrainConfig) -> GroupSampler:
        check_recipe(cfg)
        rows = first_rows(read_training_examples(cfg.data.train), cfg)
        # The file's order is kept, so the sampler's rows, and a resume's, are the same every run.
        examples = [ex for ex in rows if ex.negatives]
        if not examples:
            raise BidirError(
                f"{cfg.data.train}: none of its {len(rows)} training rows has hard negatives (neg_doc), and "
                "objective: reranker scores each query's positive against them (bidir-mine adds them)"
            )
        if cfg.rerank.loss in DISTILL_LOSSES:
            require_teacher_scores(examples, f"rerank.loss={cfg.rerank.loss}")
        return GroupSampler(
            examples,
            without_negatives=[ex for ex in rows if not ex.negatives],
            global_batch_size=cfg.schedule.global_batch_size,
            num_negatives=cfg.data.num_negatives,
            seed=cfg.schedule.seed,
            where=cfg.data.train,
        )

    def __init__(self, cfg: TrainConfig, model, device: torch.device):
        self.cfg, self.model, self.device = cfg, model, device
        self.collate = PairCollator(model.tokenize_pairs, model.tokenizer.pad_token_id)
        self.score = CrossEncoderScore(model, device)
        self.chunking = Chunking.from_recipe(cfg, device)

    def forward_backward(self, batch: PairBatch, *, scale: float = 1.0) -> float:
        loss = partial(self.loss, batch=batch)
        return forward_backward(self.score, loss, batch.groups, scale=scale, chunking=self.chunking)

    def loss(self, scores: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        """rerank.loss of the pairs' scores (B * G, 1), in groups of G."""
        teacher = None if batch.teacher_scores is None else batch.teacher_scores.to(self.device)
        group = 1 + self.cfg.data.num_negatives
        return rerank_loss(self.cfg.rerank.loss, scores, group, teacher, self.cfg.loss.distill_temperature)


class GroupSampler(EpochSampler):
    """The EpochSampler of the rows with hard negatives; `without_negatives`, the rows left out, are said in its
    warning (rank 0, once) rather than when each rank builds it."""

    def __init__(self, examples: list[TrainingExample], *, without_negatives: list[TrainingExample], **kw):
        super().__init__(examples, **kw)
        self.without_negatives = without_negatives

    def warn(self, full_epochs: bool = True) -> None:
        super().warn(full_epochs)
        if self.without_negatives:
            left_out, total = len(self.without_negatives), len(self.without_negatives) + len(self.examples)
            warnings.warn(
                f"{left_out} of {total} training rows have no hard negatives (neg_doc) and are left out: a group "
                f"of the positive alone has nothing to rank (the first: {self.without_negatives[0].origin})",
                stacklevel=2,
            )


def check_recipe(cfg: TrainConfig) -> None:
    """What objective: reranker cannot do, refused in one line before anything loads."""
    if cfg.data.text_fields:
        raise BidirError("data.text_fields is for objective: mntp (reranker rows have fixed fields)")
    if cfg.data.num_negatives < 1:
        raise BidirError(
            "objective: reranker scores each query's positive against its hard negatives: set "
            "data.num_negatives >= 1 (its group is 1 + data.num_negatives pairs)"
        )
    if cfg.eval.dev is not None:
        raise BidirError(
            f"eval.dev={cfg.eval.dev}: the in-loop dev evaluation scores embedders only; objective: reranker "
            "needs eval.dev=null (score final/ with bidir-eval afterwards)"
        )
    if cfg.loss.matryoshka_dims or cfg.loss.distill != "none":
        raise BidirError(
            "loss.matryoshka_dims and loss.distill are for embedders; objective: reranker's loss is "
            "rerank.loss (kl and margin_mse distill)"
        )


@dataclass(frozen=True)
class CrossEncoderScore:
    """bidir_train.step's score function of a cross-encoder: logits (n, 1) fp32 of a padded or packed chunk of
    pairs, on `device`. (bf16 on CPU is the CrossEncoder's own autocast of its decoder, which
    bidir_train.weights.load_reranker sets; pooling and head stay fp32.)"""

    model: torch.nn.Module
    device: torch.device

    def __call__(self, ids: torch.Tensor | PackedBatch, mask: torch.Tensor | None) -> torch.Tensor:
        mask = None if mask is None else mask.to(self.device)
        return self.model(ids.to(self.device), mask).float().unsqueeze(-1)


class PairCollator:
    """Samples -> PairBatch: each sample's (query, positive) then (query, negative) pairs, through the model's
    tokenize_pairs (template, max length, truncation counted), right padded."""

    def __init__(self, tokenize_pairs: Callable, pad_token_id: int):
        self.tokenize_pairs, self.pad = tokenize_pairs, pad_token_id

    def __call__(self, samples: list[Sample]) -> PairBatch:
        pairs = [(s.query, passage) for s in samples for passage in (s.positive, *s.negatives)]
        ids, truncated = self.tokenize_pairs(pairs)
        ids, mask = pad_batch(ids, self.pad)
        return PairBatch(
            ids=ids,
            mask=mask,
            teacher_scores=teacher_scores(samples),
            tokens=int(mask.sum()),
            truncated=truncated,
        )
