"""Epoch sampling: seeded, fresh hard negatives each epoch, rank blocks that do not depend on the world size."""

from __future__ import annotations

import pytest

from bidir_core.datasets import TrainingExample
from bidir_core.errors import BidirError
from bidir_train.contrastive import Collator, EpochSampler
from bidir_train.objective import ShuffledSampler, rank_micro_batches


def _examples(n=12, negatives=6):
    return [
        TrainingExample(
            query=f"q{i}",
            positives=(f"p{i}",),
            negatives=tuple(f"n{i}.{k}" for k in range(negatives)),
            origin=f"train.jsonl:{i + 1}",
        )
        for i in range(n)
    ]


def test_negatives_are_sampled_per_epoch_and_seeded():
    sampler = EpochSampler(_examples(), global_batch_size=4, num_negatives=2, seed=7, where="x")
    again = EpochSampler(_examples(), global_batch_size=4, num_negatives=2, seed=7, where="x")
    epoch0 = [r for s in range(3) for r in sampler.rows(0, s)]
    epoch1 = [r for s in range(3) for r in sampler.rows(1, s)]
    assert epoch0 == [r for s in range(3) for r in again.rows(0, s)]  # same seed, same draw
    assert sorted(r.query for r in epoch0) == sorted(f"q{i}" for i in range(12))  # every example once
    negs0 = {r.query: r.negatives for r in epoch0}
    negs1 = {r.query: r.negatives for r in epoch1}
    assert negs0 != negs1  # a fresh draw each epoch
    firsts = sum(
        r.negatives == (f"{r.query.replace('q', 'n')}.0", f"{r.query.replace('q', 'n')}.1") for r in epoch0
    )
    assert firsts < 12  # not always the first ones
    for r in epoch0:
        assert len(set(r.negatives)) == 2 and all(
            n.startswith(r.query.replace("q", "n") + ".") for n in r.negatives
        )
    other_seed = EpochSampler(_examples(), global_batch_size=4, num_negatives=2, seed=8, where="x")
    assert [r.query for s in range(3) for r in other_seed.rows(0, s)] != [r.query for r in epoch0]


def test_epochs_are_the_shuffled_samplers():
    """The contrastive epoch is ShuffledSampler's: the same steps, left-out rows and example order (MNTP's and
    CoSENT's), with a positive and negatives drawn for each example."""
    args = dict(global_batch_size=4, seed=3, where="x")
    examples = _examples(14)
    contrastive, plain = EpochSampler(examples, num_negatives=2, **args), ShuffledSampler(examples, **args)
    assert (contrastive.steps_per_epoch, contrastive.unused_per_epoch) == (plain.steps_per_epoch, 2) == (3, 2)
    for epoch, step in ((0, 0), (0, 2), (1, 1)):
        assert [r.query for r in contrastive.rows(epoch, step)] == [
            ex.query for ex in plain.rows(epoch, step)
        ]


def test_rank_blocks_form_the_same_groups_at_any_world_size():
    rows = EpochSampler(_examples(16), global_batch_size=8, num_negatives=0, seed=0, where="x").rows(0, 0)
    one = rank_micro_batches(rows, 4, rank=0, world=1)  # 2 micro-batches of 4
    two = [rank_micro_batches(rows, 2, rank=r, world=2) for r in range(2)]  # per rank: 2 micro-batches of 2
    for k in range(2):
        assert two[0][k] + two[1][k] == one[k]  # group k = rank 0's block then rank 1's


def test_fewer_negatives_than_asked_are_repeated_and_counted():
    examples = _examples(4, negatives=1)
    sampler = EpochSampler(examples, global_batch_size=4, num_negatives=3, seed=0, where="x")
    assert sampler.short_of_negatives == 4
    assert all(len(r.negatives) == 3 for r in sampler.rows(0, 0))


def test_missing_negatives_name_the_row():
    examples = [*_examples(3), TrainingExample(query="q", positives=("p",), origin="train.jsonl:4")]
    with pytest.raises(BidirError, match=r"train.jsonl:4: no hard negatives, but data.num_negatives=1"):
        EpochSampler(examples, global_batch_size=2, num_negatives=1, seed=0, where="x")


def test_collator_groups_passages_by_query_and_counts_truncation():
    from bidir_core.testing import tiny_tokenizer

    sampler = EpochSampler(_examples(4, negatives=2), global_batch_size=4, num_negatives=2, seed=0, where="x")
    rows = sampler.rows(0, 0)
    collate = Collator(
        tiny_tokenizer(), query_prefix="query: ", passage_prefix="passage: ", query_max=4, passage_max=64
    )
    batch = collate(rows)
    assert batch.query_ids.shape[0] == 4 and batch.passage_ids.shape[0] == 12
    assert batch.truncated == 4  # every "query: qN" is longer than 4 tokens
    assert batch.query_mask.sum(-1).tolist() == [4, 4, 4, 4]
    # Passage keys: positive then its negatives, per query; the positive's key is also the query's positive key.
    assert batch.passage_keys.view(4, 3)[:, 0].tolist() == batch.positive_keys[:, 0].tolist()
    assert len(set(batch.passage_keys.tolist())) == 12
