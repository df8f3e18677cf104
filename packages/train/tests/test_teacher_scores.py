"""Teacher scores in training rows (pos_score / neg_scores): read and checked row by row, carried with the sampled
negatives, and the contrastive objective's distillation term (loss.distill) against its formula."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bidir_core.datasets import TrainingExample, read_training_examples
from bidir_core.errors import BidirError
from bidir_core.testing import tiny_tokenizer
from bidir_train.config import LossConfig
from bidir_train.contrastive import Collator, EpochSampler, group_distillation, require_teacher_scores


def _write(tmp_path, *rows) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_scores_are_read_one_per_document(tmp_path):
    path = _write(
        tmp_path,
        {"query": "q", "pos_doc": "p", "neg_doc": ["a", "b"], "pos_score": 3, "neg_scores": [1.5, -2]},
        {"query": "q2", "pos_doc": ["p1", "p2"], "pos_score": [1, 2]},
        {"query": "q3", "pos_doc": "p", "neg_doc": ["a"]},
    )
    a, b, c = read_training_examples(path)
    assert a.positive_scores == (3.0,) and a.negative_scores == (1.5, -2.0)
    assert b.positive_scores == (1.0, 2.0) and b.negative_scores == ()
    assert c.positive_scores == c.negative_scores == ()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"query": "q", "pos_doc": "p", "neg_doc": ["a"], "pos_score": 1, "neg_scores": [NaN]}', "neg_scores[0] is nan"),
        ('{"query": "q", "pos_doc": "p", "pos_score": Infinity}', "pos_score[0] is inf"),
        ('{"query": "q", "pos_doc": "p", "neg_doc": ["a", "b"], "pos_score": 1, "neg_scores": [1]}',
         "'neg_scores' has 1 scores for 2 neg_doc"),
        ('{"query": "q", "pos_doc": "p", "neg_doc": ["a"], "pos_score": 1}', "no 'neg_scores'"),
        ('{"query": "q", "pos_doc": "p", "neg_doc": ["a"], "neg_scores": [1]}', "no 'pos_score'"),
        ('{"query": "q", "pos_doc": "p", "pos_score": "high"}', "pos_score[0] must be a number"),
        ('{"query": "q", "pos_doc": "p", "pos_score": true}', "pos_score[0] must be a number"),
    ],
)  # fmt: skip
def test_bad_scores_are_one_line_naming_the_row(tmp_path, row, message):
    ok = {"query": "q", "pos_doc": "p", "neg_doc": ["a"], "pos_score": 1, "neg_scores": [0]}
    path = _write(tmp_path, ok, row)
    with pytest.raises(BidirError) as e:
        list(read_training_examples(path))
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def _scored(n=8, negatives=5):
    return [
        TrainingExample(
            query=f"q{i}",
            positives=(f"p{i}",),
            negatives=tuple(f"n{i}.{k}" for k in range(negatives)),
            positive_scores=(100.0 + i,),
            negative_scores=tuple(float(10 * i + k) for k in range(negatives)),
            origin=f"train.jsonl:{i + 1}",
        )
        for i in range(n)
    ]


def test_sampled_negatives_carry_their_own_scores():
    sampler = EpochSampler(_scored(), global_batch_size=4, num_negatives=3, seed=1, where="x")
    for epoch in (0, 1):
        for s in sampler.rows(epoch, 0) + sampler.rows(epoch, 1):
            i = int(s.query[1:])
            assert s.teacher_scores[0] == 100.0 + i
            assert s.teacher_scores[1:] == tuple(float(10 * i + int(n.split(".")[1])) for n in s.negatives)


def test_collated_scores_follow_the_passages():
    sampler = EpochSampler(_scored(), global_batch_size=4, num_negatives=2, seed=0, where="x")
    rows = sampler.rows(0, 0)
    collate = Collator(tiny_tokenizer(), query_prefix="", passage_prefix="", query_max=8, passage_max=8)
    batch = collate(rows)
    assert batch.teacher_scores.tolist() == [t for s in rows for t in s.teacher_scores]
    unscored = [TrainingExample("q", ("p",), ("n",))] * 4
    plain = EpochSampler(unscored, global_batch_size=4, num_negatives=1, seed=0, where="x")
    assert collate(plain.rows(0, 0)).teacher_scores is None


def test_rows_without_scores_are_refused_naming_the_first():
    rows = [*_scored(2), TrainingExample("q", ("p",), ("n",), origin="train.jsonl:3")]
    with pytest.raises(BidirError, match=r"^train.jsonl:3: no teacher scores .* loss.distill=kl") as e:
        require_teacher_scores(rows, "loss.distill=kl")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["kl", "margin_mse"])
def test_embedder_distillation_over_each_querys_own_group(name):
    g = torch.Generator().manual_seed(3)
    B, G, D = 2, 3, 8
    q, p = torch.randn(B, D, generator=g), torch.randn(B * G, D, generator=g)
    teacher = torch.randn(B * G, generator=g) * 4
    cfg = LossConfig(temperature=0.05, distill=name, distill_temperature=2.0)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )

    total, count = 0.0, 0
    for i in range(B):
        s = [cos(q[i].tolist(), p[i * G + j].tolist()) / 0.05 for j in range(G)]
        t = teacher[i * G : (i + 1) * G].tolist()
        if name == "kl":
            T = 2.0
            zs, zt = sum(math.exp(x / T) for x in s), sum(math.exp(x / T) for x in t)
            ps = [math.exp(x / T) / zt for x in t]
            qs = [math.exp(x / T) / zs for x in s]
            total += T * T * sum(a * math.log(a / b) for a, b in zip(ps, qs, strict=True))
            count += 1
        else:
            for j in range(1, G):
                total += ((s[0] - s[j]) - (t[0] - t[j])) ** 2
                count += 1
    got = group_distillation(q, p, teacher, cfg, G).item()
    assert got == pytest.approx(total / count, rel=1e-4)


def test_distillation_in_the_loop_adds_to_infonce_and_survives_gradcache(tiny_args, tmp_path):
    """loss.distill on scored rows: the first step's loss is InfoNCE's plus the term (so larger, the term being
    > 0), and GradCache gives the same losses."""
    from train_testing import loss_curve, train_recipe

    rows = [
        {"query": f"how do i sort item {i}", "pos_doc": f"sort item {i}", "neg_doc": [f"other {i} {k}" for k in range(3)],
         "pos_score": 4.0, "neg_scores": [float(k - 2) for k in range(3)]}
        for i in range(8)
    ]  # fmt: skip
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"data.train={data}", "schedule.max_steps=2", "checkpoint.every_steps=0")
    train_recipe(tiny_args(tmp_path / "plain", *common))
    train_recipe(tiny_args(tmp_path / "kl", *common, "loss.distill=kl"))
    train_recipe(tiny_args(tmp_path / "cached", *common, "loss.distill=kl", "loss.cache_chunk_size=2"))
    plain, kl = loss_curve(tmp_path / "plain"), loss_curve(tmp_path / "kl")
    assert kl[0] > plain[0] + 1e-4
    assert loss_curve(tmp_path / "cached") == pytest.approx(kl, abs=1e-5)
