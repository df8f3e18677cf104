"""The contrastive objective: (query, positive, hard negatives) rows -> InfoNCE (bidir_train.loss).

Data. Every epoch draws a fresh permutation of the examples, and for each example one of its positives and
`num_negatives` of its hard negatives, from a RNG seeded by (seed, epoch): not always the first ones, yet the same
on every rank and after a resume. A step takes the next `global_batch_size` examples of the permutation; micro-batch
k of rank r is the contiguous block [(k * W + r) * m, (k * W + r + 1) * m) of the step's rows (m = micro batch size,
W = world size), so a micro-batch group (m x W rows, the in-batch negatives) is the same rows whatever W is.
The data position of a run is just (epoch, step in epoch): nothing else to save for a resume.

Step: bidir_train.step embeds the queries and the passages (plain, in length-sorted chunks, packed, or with GradCache,
as the recipe's chunking says) and backwards the InfoNCE loss over them.

Distillation (loss.distill): rows with teacher scores (pos_score / neg_scores, e.g. a reranker's) add
loss.distill_weight x a kl or margin_mse term (bidir_train.rerank_loss) over each query's own group, its positive
and sampled hard negatives, the student's scores being InfoNCE's logits (cosine / loss.temperature).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from bidir_core.batching import pad_batch
from bidir_core.datasets import TrainingExample, read_training_examples
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.tokenization import tokenize
from bidir_train.config import LossConfig, TrainConfig
from bidir_train.loss import doc_key, info_nce
from bidir_train.objective import ShuffledSampler, first_rows, warn_left_out
from bidir_train.rerank_loss import rerank_loss
from bidir_train.step import Chunking, EncoderEmbed, Group, forward_backward


class Contrastive:
    """The objective bidir_train.trainer runs for `objective: contrastive` (see bidir_train.objective)."""

    @classmethod
    def sampler(cls, cfg: TrainConfig) -> EpochSampler:
        if cfg.data.text_fields:
            raise BidirError("data.text_fields is for objective: mntp (contrastive rows have fixed fields)")
        examples = first_rows(read_training_examples(cfg.data.train), cfg)
        if cfg.loss.distill != "none":
            if not cfg.data.num_negatives:
                raise BidirError(f"loss.distill={cfg.loss.distill} compares each query's positive with its hard "
                                 "negatives: set data.num_negatives >= 1")  # fmt: skip
            require_teacher_scores(examples, f"loss.distill={cfg.loss.distill}")
        return EpochSampler(
            examples,
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
        self.embed = EncoderEmbed(encoder, device)  # raw embeddings: info_nce normalizes per Matryoshka dim
        self.chunking = Chunking.from_recipe(cfg, device)

    def forward_backward(self, batch: MicroBatch, *, scale: float = 1.0) -> float:
        loss = partial(self.loss, batch=batch)
        return forward_backward(self.embed, loss, batch.groups, scale=scale, chunking=self.chunking)

    def loss(self, q: torch.Tensor, p: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
        """InfoNCE of queries q (B, D) against passages p (B * (1 + N), D), grouped by query."""
        cfg, mask = self.cfg.loss, self.cfg.loss.mask_false_negatives
        loss = info_nce(
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
        if cfg.distill == "none":
            return loss
        teacher = batch.teacher_scores.to(self.device)
        return loss + cfg.distill_weight * group_distillation(
            q, p, teacher, cfg, 1 + self.cfg.data.num_negatives
        )


def group_distillation(
    q: torch.Tensor, p: torch.Tensor, teacher: torch.Tensor, cfg: LossConfig, group: int
) -> torch.Tensor:
    """loss.distill over each query's own group (no in-batch passages): the student's scores are InfoNCE's logits,
    cosine / loss.temperature, of query i (B, D) against its `group` passages (B * group, D), positive first;
    teacher (B * group,) the data's scores of the same passages."""
    q, p = F.normalize(q.float(), dim=-1), F.normalize(p.float(), dim=-1)
    cos = (q.unsqueeze(1) * p.view(q.shape[0], group, -1)).sum(-1)  # (B, group)
    scores = cos.reshape(-1) / cfg.temperature
    return rerank_loss(cfg.distill, scores, group, teacher, cfg.distill_temperature)


def require_teacher_scores(examples: list[TrainingExample], what: str) -> None:
    """Every example has teacher scores (pos_score / neg_scores), else one line naming the first that has none."""
    bare = [ex for ex in examples if not ex.positive_scores]
    if bare:
        raise BidirError(
            f"{bare[0].origin or 'a training row'}: no teacher scores (pos_score / neg_scores), which {what} "
            f"learns from ({len(bare)} of {len(examples)} rows lack them; bidir-mine --rescore writes them)"
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
    # The data's teacher scores of the positive, then of each negative; empty when the row has none.
    teacher_scores: tuple[float, ...] = ()


@dataclass(frozen=True)
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
    teacher_scores: torch.Tensor | None = None  # (B * (1 + N),) float32 of the rows' pos_score / neg_scores

    @property
    def groups(self) -> tuple[Group, Group]:
        """What bidir_train.step embeds: the queries, then the passages."""
        return (self.query_ids, self.query_mask), (self.passage_ids, self.passage_mask)


def _key(doc_id: str, text: str) -> int:
    # Without an id, a passage's text is its identity: the same text is the same document.
    return doc_key(doc_id) if doc_id else doc_key("text:" + text)


class EpochSampler(ShuffledSampler):
    """Examples -> the rows of (epoch, step): ShuffledSampler's seeded permutation, each example drawn with one of
    its positives and num_negatives of its hard negatives by the generator that drew the permutation."""

    noun = "training examples"

    def __init__(
        self,
        examples: Iterable[TrainingExample],
        *,
        global_batch_size: int,
        num_negatives: int,
        seed: int,
        where: str,
    ):
        examples = list(examples)
        if not examples:
            raise BidirError(f"{where}: no training examples")
        super().__init__(examples, global_batch_size=global_batch_size, seed=seed, where=where)
        self.num_negatives = num_negatives
        if num_negatives:
            bare = [ex for ex in self.examples if not ex.negatives]
            if bare:
                raise BidirError(
                    f"{bare[0].origin or where}: no hard negatives, but data.num_negatives={num_negatives} "
                    f"({len(bare)} such examples; set data.num_negatives=0 or add neg_doc)"
                )
        self.short_of_negatives = sum(1 for ex in self.examples if 0 < len(ex.negatives) < num_negatives)

    def draw(self, epoch: int) -> list[Sample]:
        """The epoch's rows in step order, with their sampled positives and negatives: after the permutation, the
        same generator draws each used example's positive, then its negatives, in the permutation's order."""
        order, rng = self.permutation(epoch)
        return [
            self._sample(self.examples[i], rng)
            for i in order[: self.steps_per_epoch * self.global_batch_size]
        ]

    def _sample(self, ex: TrainingExample, rng: random.Random) -> Sample:
        p = rng.randrange(len(ex.positives))
        negs = self._negatives(rng, len(ex.negatives))
        pos_ids = ex.positive_ids or ("",) * len(ex.positives)
        neg_ids = ex.negative_ids or ("",) * len(ex.negatives)
        return Sample(
            query=ex.query,
            positive=ex.positives[p],
            negatives=tuple(ex.negatives[j] for j in negs),
            passage_keys=(_key(pos_ids[p], ex.positives[p]),)
            + tuple(_key(neg_ids[j], ex.negatives[j]) for j in negs),
            positive_keys=tuple(_key(d, t) for d, t in zip(pos_ids, ex.positives, strict=True)),
            teacher_scores=(ex.positive_scores[p], *(ex.negative_scores[j] for j in negs))
            if ex.positive_scores
            else (),
        )

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
            teacher_scores=teacher_scores(samples),
            tokens=int(query_mask.sum() + passage_mask.sum()),
            truncated=q_cut + p_cut,
        )


def teacher_scores(samples: list[Sample]) -> torch.Tensor | None:
    """The samples' teacher scores (positive, then negatives, per sample) as one (n,) float32 tensor, or None when
    a sample has none (the losses that need them refused such rows before the model loaded)."""
    if not all(s.teacher_scores for s in samples):
        return None
    return torch.tensor([t for s in samples for t in s.teacher_scores], dtype=torch.float32)
