"""The reranker's losses (bidir_train.rerank_loss) against their textbook formulas, written here with plain Python
math over the same numbers."""

from __future__ import annotations

import math

import pytest
import torch

from bidir_core.errors import BidirError
from bidir_train.rerank_loss import rerank_loss

B, G = 3, 4


@pytest.fixture
def scores():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B * G, generator=g) * 3, torch.randn(B * G, generator=g) * 3


def _rows(x: torch.Tensor) -> list[list[float]]:
    return [x[i * G : (i + 1) * G].tolist() for i in range(B)]


def _softmax(xs: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def test_group_ce_is_softmax_cross_entropy_with_the_positive_first(scores):
    s, _ = scores
    expected = sum(-math.log(_softmax(row)[0]) for row in _rows(s)) / B
    assert rerank_loss("group_ce", s, G).item() == pytest.approx(expected, rel=1e-6)
    assert rerank_loss("group_ce", s.view(-1, 1), G).item() == pytest.approx(expected, rel=1e-6)  # (n, 1) too


def test_bce_labels_the_positive_1_and_the_negatives_0(scores):
    s, _ = scores

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    terms = [
        -math.log(sigmoid(x)) if j == 0 else -math.log(1 - sigmoid(x))
        for row in _rows(s)
        for j, x in enumerate(row)
    ]
    assert rerank_loss("bce", s, G).item() == pytest.approx(sum(terms) / (B * G), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_is_the_teachers_distribution_against_the_students_times_t_squared(scores, temperature):
    s, t = scores
    total = 0.0
    for srow, trow in zip(_rows(s), _rows(t), strict=True):
        p = _softmax([x / temperature for x in trow])
        q = _softmax([x / temperature for x in srow])
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected = total / B * temperature**2
    got = rerank_loss("kl", s, G, teacher=t, temperature=temperature).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert rerank_loss("kl", t, G, teacher=t, temperature=temperature).item() == pytest.approx(0, abs=1e-6)


def test_margin_mse_compares_positive_minus_negative_margins(scores):
    s, t = scores
    errs = [
        ((srow[0] - srow[j]) - (trow[0] - trow[j])) ** 2
        for srow, trow in zip(_rows(s), _rows(t), strict=True)
        for j in range(1, G)
    ]
    got = rerank_loss("margin_mse", s, G, teacher=t).item()
    assert got == pytest.approx(sum(errs) / len(errs), rel=1e-6)
    # Margins only: shifting the student's scores of a query by a constant changes nothing.
    assert rerank_loss("margin_mse", s + 7, G, teacher=t).item() == pytest.approx(got, rel=1e-5)


@pytest.mark.parametrize("name", ["kl", "margin_mse"])
def test_a_distillation_loss_without_teacher_scores_is_one_line(scores, name):
    with pytest.raises(BidirError, match=f"^loss {name} needs teacher scores") as e:
        rerank_loss(name, scores[0], G)
    assert "\n" not in str(e.value)
