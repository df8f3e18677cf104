"""bidir_core.fusion: reciprocal-rank fusion and the min-max weighted sum, checked against the formulas by hand."""

from __future__ import annotations

import math

import pytest

from bidir_core.errors import BidirError
from bidir_core.fusion import RRF_K, fuse, fuse_reranked

DENSE = {"q": {"a": 0.9, "b": 0.7, "c": 0.1}}
LEXICAL = {"q": {"c": 12.0, "a": 4.0, "d": 2.0}}


def test_rrf_is_the_sum_of_reciprocal_ranks():
    fused = fuse([DENSE, LEXICAL], "rrf")["q"]
    want = {
        "a": 1 / (RRF_K + 1) + 1 / (RRF_K + 2),
        "b": 1 / (RRF_K + 2),
        "c": 1 / (RRF_K + 3) + 1 / (RRF_K + 1),
        "d": 1 / (RRF_K + 3),
    }
    assert fused == pytest.approx(want)
    assert list(fused) == ["a", "c", "b", "d"]  # best first


def test_weighted_sums_min_max_normalized_scores():
    fused = fuse([DENSE, LEXICAL], "weighted", weights=[0.75, 0.25])["q"]
    dense = {"a": 1.0, "b": (0.7 - 0.1) / 0.8, "c": 0.0}
    lexical = {"c": 1.0, "a": 0.2, "d": 0.0}
    want = {d: 0.75 * dense.get(d, 0.0) + 0.25 * lexical.get(d, 0.0) for d in "abcd"}
    assert fused == pytest.approx(want)


def test_queries_are_the_union_and_top_k_cuts():
    fused = fuse([DENSE, {"q2": {"x": 1.0}}], "rrf", top_k=2)
    assert set(fused) == {"q", "q2"} and list(fused["q"]) == ["a", "b"]
    assert fused["q2"] == {"x": pytest.approx(1 / (RRF_K + 1))}


def test_one_run_keeps_its_order():
    for fusion in ("rrf", "weighted"):
        assert list(fuse([LEXICAL], fusion)["q"]) == ["c", "a", "d"]


def test_equal_scores_normalize_to_one():
    assert fuse([{"q": {"a": 3.0, "b": 3.0}}], "weighted")["q"] == {"b": 1.0, "a": 1.0}


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ([DENSE], {"fusion": "max"}, "fusion must be one of weighted, rrf, got 'max'"),
        ([], {}, "fusion needs at least one run"),
        ([DENSE, LEXICAL], {"weights": [1.0]}, "fusion weights must be 2 finite non-negative numbers"),
        (
            [DENSE, LEXICAL],
            {"weights": [1.0, math.nan]},
            "fusion weights must be 2 finite non-negative numbers",
        ),
        ([DENSE], {"top_k": 0}, "top_k must be a positive integer, got 0"),
        ([{"q": {"a": math.inf}}], {"fusion": "weighted"}, "a run holds a non-finite (nan/inf) score"),
    ],
)
def test_refusals(args, kwargs, message):
    with pytest.raises(BidirError) as e:
        fuse(list(args), **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fuse_reranked_interpolates_over_the_reranked_documents_only():
    first = {"q": {"a": 9.0, "b": 5.0, "c": 1.0, "d": 0.5}, "empty": {"x": 1.0}}
    reranked = {"q": {"a": -2.0, "b": 3.0, "c": 0.0}, "empty": {}}  # the reranker saw the first stage's top 3
    fused = fuse_reranked(reranked, first)
    # weighted, equal weights: min-max of each over a, b, c (d never enters: the reranker did not score it)
    rr = {"a": 0.0, "b": 1.0, "c": 2.0 / 5.0}
    lex = {"a": 1.0, "b": 0.5, "c": 0.0}
    assert fused["q"] == pytest.approx({d: rr[d] + lex[d] for d in "abc"})
    assert list(fused["q"]) == ["b", "a", "c"] and fused["empty"] == {}
    by_rank = fuse_reranked(reranked, first, "rrf")["q"]
    assert by_rank == pytest.approx(
        {
            "a": 1 / (RRF_K + 3) + 1 / (RRF_K + 1),
            "b": 1 / (RRF_K + 1) + 1 / (RRF_K + 2),
            "c": 1 / (RRF_K + 2) + 1 / (RRF_K + 3),
        }
    )


def test_fuse_reranked_refuses_a_document_the_first_stage_lacks():
    with pytest.raises(BidirError, match="query 'q' holds document 'z', which its first stage does not"):
        fuse_reranked({"q": {"z": 1.0}}, {"q": {"a": 1.0}})
