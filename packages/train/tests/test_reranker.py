"""objective: reranker: what its recipe and rows must hold (refused in one line before the model loads), its groups
of pairs, and its step's gradients whatever the chunking (packed, sorted chunks, GradCache)."""

from __future__ import annotations

import json
import warnings

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
@pytest.mark.parametrize("loss", ["group_ce", "bce", "kl", "margin_mse"])
def test_rows_without_negatives_are_left_out_in_one_warning(tmp_path, loss):
    """bidir-mine's margin filter can leave a row no negatives (pos_score alone with --rescore): such rows are left
    out of every epoch, counted in one warning naming the first, and the others are sampled as ever."""
    path = tmp_path / "train.jsonl"
    rows = []
    for i in range(12):
        negatives = [] if i % 3 == 1 else [f"n{i}.{k}" for k in range(3)]
        row = {"query": f"q{i}", "pos_doc": f"p{i}", "neg_doc": negatives, "pos_score": 5.0}
        rows.append(row | ({"neg_scores": [0.0] * 3} if negatives else {}))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sampler = Reranker.sampler(_recipe(path, f"rerank.loss={loss}"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler.warn(full_epochs=True)
    assert [str(w.message) for w in caught] == [
        "4 of 12 training rows have no hard negatives (neg_doc) and are left out: a group of the positive alone has "
        f"nothing to rank (the first: {path}:2)"
    ]
    with_negatives = {f"q{i}" for i in range(12) if i % 3 != 1}
    assert sampler.steps_per_epoch == 2 and sampler.unused_per_epoch == 0
    for epoch in range(2):
        drawn = [s.query for step in range(2) for s in sampler.rows(epoch, step)]
        assert sorted(drawn) == sorted(with_negatives)
    # The same rows in the same order on every build of the sampler: a resume draws what the run drew.
    again = Reranker.sampler(_recipe(path, f"rerank.loss={loss}"))
    assert again.rows(1, 1) == sampler.rows(1, 1)


@pytest.mark.usefixtures("device")
def test_a_file_without_any_negatives_is_refused(tmp_path):
    path = _rows(tmp_path, scored=False, negatives=0)
    with pytest.raises(BidirError, match=rf"^{path}: none of its 8 training rows has hard negatives") as e:
        Reranker.sampler(_recipe(path))
    assert "\n" not in str(e.value)


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


def _cross_encoder():
    from bidir_core.cross_encoder import CrossEncoder, new_score_head
    from bidir_core.reranker_config import RerankerConfig
    from bidir_core.testing import tiny_model, tiny_tokenizer

    model = tiny_model()
    return CrossEncoder(
        model,
        tiny_tokenizer(),
        RerankerConfig("{query}|{passage}", max_length=40),
        new_score_head(model.config, seed=1),
    )


@pytest.mark.parametrize(
    "chunking",
    [
        ("schedule.packing=packed", "schedule.max_tokens_per_forward=40"),
        ("schedule.packing=padded", "schedule.forward_chunk_size=3"),
        ("schedule.packing=padded", "loss.cache_chunk_size=4"),
        ("schedule.packing=packed", "schedule.max_tokens_per_forward=40", "loss.cache_chunk_size=5"),
    ],
)
@pytest.mark.parametrize("loss", ["group_ce", "kl"])
def test_chunked_and_packed_gradients_equal_one_padded_forward(tmp_path, device, chunking, loss):
    """The micro-batch's pairs (varying lengths, some cut at max_length) scored in packed forwards, sorted chunks
    or GradCache chunks: the loss and every parameter's gradient (the head's included) are those of one padded
    forward."""
    import torch

    data = tmp_path / "train.jsonl"
    rows = [
        {
            "query": f"q{i} " + "w " * (i % 4),
            "pos_doc": "pos " * (1 + i % 3),
            "neg_doc": [f"neg{k} " * (1 + 3 * ((i + k) % 5)) for k in range(3)],
            "pos_score": float(i),
            "neg_scores": [float(k) for k in range(3)],
        }
        for i in range(8)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = _cross_encoder()

    def grads(*extra):
        cfg = _recipe(data, f"rerank.loss={loss}", "schedule.micro_batch_size=4", *extra)
        objective = Reranker(cfg, model, device)
        batch = objective.collate(Reranker.sampler(cfg).rows(0, 0)[:4])
        model.zero_grad(set_to_none=True)
        value = objective.forward_backward(batch, scale=0.5)
        return value, {n: p.grad.clone() for n, p in model.named_parameters()}, batch

    plain_loss, plain, batch = grads("schedule.packing=padded")
    assert batch.truncated > 0 and len(set(batch.mask.sum(-1).tolist())) > 2  # cut pairs, varying lengths
    loss_value, chunked, _ = grads(*chunking)
    assert loss_value == pytest.approx(plain_loss, rel=1e-5)
    assert plain.keys() == chunked.keys() and "score.weight" in plain
    for name, grad in plain.items():
        torch.testing.assert_close(
            chunked[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert plain["score.weight"].abs().sum() > 0
