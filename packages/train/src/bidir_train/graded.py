"""The graded-pairs objective (`objective: cosent`): STS-style rows (score, sentence1, sentence2) -> CoSENT
(bidir_train.loss.cosent), which trains the cosine of each pair to rank the pairs as their gold scores do.

InfoNCE only knows "positive" and "not": a 3.8-of-5 pair is as negative as an unrelated one, and pairs below a cut
are thrown away. CoSENT uses every graded pair and its score, which is what an STS benchmark measures.

Data: data.train is an STS TSV file (bidir_core.datasets.read_sts: `score<TAB>sentence1<TAB>sentence2`, an optional
header). Every epoch is a fresh permutation seeded by (seed, epoch), the same on every rank and after a resume. Both
sentences are embedded the way bidir_core.evaluation.evaluate_sts embeds them, as queries: query_prefix, cut to
query_max_length. The ranking is over the pairs of one micro-batch (B pairs: B * (B - 1) / 2 comparisons); a step
with gradient accumulation or several ranks averages the micro-batches' losses, like the contrastive objective
without gathering. With loss.cache_chunk_size, GradCache (bidir_train.contrastive.forward_backward) bounds memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bidir_core.batching import pad_batch
from bidir_core.datasets import StsPair, read_sts
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.tokenization import tokenize
from bidir_train.config import TrainConfig
from bidir_train.contrastive import forward_backward
from bidir_train.loss import cosent
from bidir_train.objective import ShuffledSampler, first_rows


@dataclass
class GradedBatch:
    """One rank's micro-batch: sentence1 as queries (P, T1), sentence2 as passages (P, T2), and the gold scores;
    the field names are those bidir_train.contrastive.forward_backward embeds."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    passage_ids: torch.Tensor
    passage_mask: torch.Tensor
    scores: torch.Tensor  # (P,) float32
    tokens: int  # real (non-pad) tokens in the micro-batch
    truncated: int  # texts cut to their max length


class Graded:
    """The objective bidir_train.trainer runs for `objective: cosent` (see bidir_train.objective)."""

    @classmethod
    def sampler(cls, cfg: TrainConfig) -> PairSampler:
        where = cfg.data.train
        if cfg.data.text_fields or cfg.data.num_negatives:
            raise BidirError("objective: cosent reads score, sentence1, sentence2 rows: no data.text_fields or "
                             "data.num_negatives")  # fmt: skip
        if Path(where).suffix.lower() not in (".tsv", ".txt"):
            raise BidirError(
                f"data.train={where}: objective: cosent needs an STS-style TSV file (score<TAB>sentence1<TAB>"
                "sentence2), e.g. STS-B train"
            )
        pairs = first_rows(read_sts(where), cfg)
        if len({p.score for p in pairs}) == 1:
            # CoSENT compares only pairs of different scores: with none, every step's loss and gradient are 0.
            kept = f" (data.max_examples={cfg.data.max_examples})" if cfg.data.max_examples else ""
            raise BidirError(
                f"{where}: all {len(pairs)} gold scores are equal ({pairs[0].score}){kept}: CoSENT learns only "
                "from pairs scored differently, so it would train nothing"
            )
        return PairSampler(
            pairs, global_batch_size=cfg.schedule.global_batch_size, seed=cfg.schedule.seed, where=where
        )

    def __init__(self, cfg: TrainConfig, encoder: BiEncoder, device: torch.device):
        self.cfg, self.encoder, self.device = cfg, encoder, device
        self.collate = PairCollator(
            encoder.tokenizer, prefix=cfg.model.query_prefix, max_length=cfg.model.query_max_length
        )

    def forward_backward(self, batch: GradedBatch, *, scale: float = 1.0) -> float:
        return forward_backward(
            self.embed,
            self.loss,
            batch,
            scale=scale,
            cache_chunk=self.cfg.loss.cache_chunk_size,
            forward_chunk=self.cfg.schedule.forward_chunk_size,
        )

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw embeddings (n, D): cosent normalizes after each Matryoshka truncation."""
        return self.encoder(ids.to(self.device), mask.to(self.device), normalize=False)

    def loss(self, a: torch.Tensor, b: torch.Tensor, batch: GradedBatch) -> torch.Tensor:
        scores = batch.scores.to(self.device)
        return cosent(a, b, scores, scale=self.cfg.loss.cosent_scale, dims=self.cfg.loss.matryoshka_dims)


class PairSampler(ShuffledSampler):
    """Graded pairs -> the rows of (epoch, step): a fresh seeded permutation per epoch, global_batch_size a step."""

    noun = "pairs"


class PairCollator:
    """StsPairs -> GradedBatch: the prefix, tokenization with counted truncation, right padding."""

    def __init__(self, tokenizer, *, prefix: str, max_length: int):
        self.tokenizer, self.prefix, self.max_length = tokenizer, prefix, max_length

    def __call__(self, pairs: list[StsPair]) -> GradedBatch:
        pad = self.tokenizer.pad_token_id
        (ids1, cut1), (ids2, cut2) = (
            tokenize(self.tokenizer, [self.prefix + s for s in side], self.max_length)
            for side in ([p.sentence1 for p in pairs], [p.sentence2 for p in pairs])
        )
        query_ids, query_mask = pad_batch(ids1, pad)
        passage_ids, passage_mask = pad_batch(ids2, pad)
        return GradedBatch(
            query_ids=query_ids,
            query_mask=query_mask,
            passage_ids=passage_ids,
            passage_mask=passage_mask,
            scores=torch.tensor([p.score for p in pairs], dtype=torch.float32),
            tokens=int(query_mask.sum() + passage_mask.sum()),
            truncated=cut1 + cut2,
        )
