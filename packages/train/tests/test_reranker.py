"""objective: reranker: what its recipe and rows must hold (refused in one line before the model loads), its groups
of pairs, and its step's gradients whatever the chunking (packed, sorted chunks, GradCache)."""

from __future__ import annotations

import json

import pytest

from bidir_core.errors import BidirError
from bidir_train import load_recipe
from bidir_train.reranker import PairCollator, Reranker


def _rows(tmp_path, n=8, scored=True, negatives=3):
    path = tmp_path / "train.jsonl"
    rows = []
    for i in range(n):
        row = {"query": f"q{i}", "pos_doc": f"p{i}", "neg_doc": [f"n{i}.{k}" for k in range(negatives)]}
        if scored:
            row |= {"pos_score": 5.0 + i, "neg_scores": [float(k - i) for k in range(negatives)]}
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(data, *extra):
    return load_recipe(
        "tiny",
        [
            "objective=reranker",
            f"data.train={data}",
            "data.num_negatives=2",
            "schedule.global_batch_size=4",
            *extra,
        ],
    )


@pytest.mark.usefixtures("device")
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("data.num_negatives=0",), "set data.num_negatives >= 1"),
        (("eval.dev=stdlib-docstrings",), "eval.dev=stdlib-docstrings: the in-loop dev evaluation scores embedders"),
        (("loss.distill=kl",), "loss.matryoshka_dims and loss.distill are for embedders"),
        (("data.text_fields=[title]",), "data.text_fields is for objective: mntp"),
    ],
)  # fmt: skip
def test_recipe_refusals_are_one_line(tmp_path, extra, message):
    with pytest.raises(BidirError, match=message) as e:
        Reranker.sampler(_recipe(_rows(tmp_path), *extra))
    assert "\n" not in str(e.value)


@pytest.mark.usefixtures("device")
@pytest.mark.parametrize("loss", ["kl", "margin_mse"])
def test_distillation_needs_every_rows_teacher_scores(tmp_path, loss):
    path = _rows(tmp_path, scored=False)
    with pytest.raises(BidirError, match=rf"^{path}:1: no teacher scores .*rerank.loss={loss}") as e:
        Reranker.sampler(_recipe(path, f"rerank.loss={loss}"))
    assert "\n" not in str(e.value)
    assert Reranker.sampler(_recipe(path, "rerank.loss=group_ce")).steps_per_epoch == 2  # needs none


@pytest.mark.usefixtures("device")
def test_a_row_without_negatives_is_refused_naming_it(tmp_path):
    path = _rows(tmp_path, scored=False, negatives=0)
    with pytest.raises(BidirError, match=rf"^{path}:1: no hard negatives"):
        Reranker.sampler(_recipe(path))


@pytest.mark.usefixtures("device")
def test_groups_are_the_positive_then_the_sampled_negatives(tmp_path):
    sampler = Reranker.sampler(_recipe(_rows(tmp_path)))
    rows = sampler.rows(0, 0)
    seen = []

    def tokenize_pairs(pairs):
        seen.extend(pairs)
        return [[1 + len(q) + len(p)] * (1 + i % 3) for i, (q, p) in enumerate(pairs)], 1

    batch = PairCollator(tokenize_pairs, pad_token_id=0)(rows)
    assert seen == [(s.query, d) for s in rows for d in (s.positive, *s.negatives)]
    assert batch.ids.shape[0] == len(rows) * 3 and batch.truncated == 1
    assert batch.tokens == int(batch.mask.sum()) == sum(1 + i % 3 for i in range(len(seen)))
    assert batch.teacher_scores.tolist() == [t for s in rows for t in s.teacher_scores]
    for s in rows:  # the positive's score first, then each drawn negative's own
        i = int(s.query[1:])
        assert s.teacher_scores == (5.0 + i, *(float(int(n.split(".")[1]) - i) for n in s.negatives))
