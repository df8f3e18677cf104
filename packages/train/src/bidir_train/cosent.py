"""The CoSENT objective (`objective: cosent`): STS-style graded-pair rows (score, sentence1, sentence2) -> CoSENT
(bidir_train.loss.cosent), which trains the cosine of each pair to rank the pairs as their gold scores do.

InfoNCE only knows "positive" and "not": a 3.8-of-5 pair is as negative as an unrelated one, and pairs below a cut
are thrown away. CoSENT uses every graded pair and its score, which is what an STS benchmark measures.

Data: data.train is an STS TSV file (bidir_core.datasets.read_sts: `score<TAB>sentence1<TAB>sentence2`, an optional
header). Every epoch is a fresh permutation seeded by (seed, epoch), the same on every rank and after a resume. Both
sentences are embedded the way bidir_core.evaluation.evaluate_sts embeds them, as queries: query_prefix, cut to
query_max_length. The ranking is over the pairs of one micro-batch (B pairs: B * (B - 1) / 2 comparisons); a step
with gradient accumulation or several ranks averages the micro-batches' losses, like the contrastive objective
without gathering. The step is bidir_train.step's, with the recipe's chunking: packed or padded forwards
(schedule.packing), length-sorted chunks (schedule.forward_chunk_size), GradCache (loss.cache_chunk_size).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from bidir_core.batching import pad_batch
from bidir_core.datasets import StsPair, read_sts
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.tokenization import tokenize
from bidir_train.config import TrainConfig
from bidir_train.loss import cosent
from bidir_train.objective import ShuffledSampler, first_rows
from bidir_train.step import Chunking, EncoderEmbed, Group, forward_backward


@dataclass(frozen=True)
class PairBatch:
    """One rank's micro-batch of P graded pairs: sentence1 (P, T1) and sentence2 (P, T2), right padded, and the
    gold scores."""

    sentence1_ids: torch.Tensor
    sentence1_mask: torch.Tensor
    sentence2_ids: torch.Tensor
    sentence2_mask: torch.Tensor
    scores: torch.Tensor  # (P,) float32
    tokens: int  # real (non-pad) tokens in the micro-batch
    truncated: int  # texts cut to their max length

    @property
    def groups(self) -> tuple[Group, Group]:
        """What bidir_train.step embeds: every sentence1, then every sentence2."""
        return (self.sentence1_ids, self.sentence1_mask), (self.sentence2_ids, self.sentence2_mask)


class Cosent:
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
        self.embed = EncoderEmbed(encoder, device)  # raw embeddings: cosent normalizes per Matryoshka dim
        self.chunking = Chunking.from_recipe(cfg, device)

    def forward_backward(self, batch: PairBatch, *, scale: float = 1.0) -> float:
        loss = partial(self.loss, batch=batch)
        return forward_backward(self.embed, loss, batch.groups, scale=scale, chunking=self.chunking)

    def loss(self, a: torch.Tensor, b: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        """CoSENT of the pairs' cosines, sentence1 a (P, D) against sentence2 b (P, D), ranked by the gold scores."""
        scores = batch.scores.to(self.device)
        return cosent(a, b, scores, scale=self.cfg.loss.cosent_scale, dims=self.cfg.loss.matryoshka_dims)


class PairSampler(ShuffledSampler):
    """Graded pairs -> the rows of (epoch, step): a fresh seeded permutation per epoch, global_batch_size a step."""

    noun = "pairs"


class PairCollator:
    """StsPairs -> PairBatch: the prefix, tokenization with counted truncation, right padding."""

    def __init__(self, tokenizer, *, prefix: str, max_length: int):
        self.tokenizer, self.prefix, self.max_length = tokenizer, prefix, max_length

    def __call__(self, pairs: list[StsPair]) -> PairBatch:
        pad = self.tokenizer.pad_token_id
        (ids1, cut1), (ids2, cut2) = (
            tokenize(self.tokenizer, [self.prefix + s for s in side], self.max_length)
            for side in ([p.sentence1 for p in pairs], [p.sentence2 for p in pairs])
        )
        ids1, mask1 = pad_batch(ids1, pad)
        ids2, mask2 = pad_batch(ids2, pad)
        return PairBatch(
            sentence1_ids=ids1,
            sentence1_mask=mask1,
            sentence2_ids=ids2,
            sentence2_mask=mask2,
            scores=torch.tensor([p.score for p in pairs], dtype=torch.float32),
            tokens=int(mask1.sum() + mask2.sum()),
            truncated=cut1 + cut2,
        )
