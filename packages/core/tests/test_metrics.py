"""Retrieval metrics, correlations and exact search against independent implementations (pytrec_eval, scipy,
a brute-force full score matrix)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from bidir_core.errors import BidirError
from bidir_core.metrics import RETRIEVAL_METRICS, pearson, retrieval_metrics, spearman
from bidir_core.search import exact_search

# pytrec_eval is trec_eval itself; the measure names for our metrics.
TREC_MEASURES = {
    "ndcg@10": "ndcg_cut_10",
    "recall@10": "recall_10",
    "recall@100": "recall_100",
    "map@100": "map_cut_100",
}


def _random_case(rng: random.Random):
    """Runs and graded qrels with ties, negative/zero grades, judged queries missing from the run or without any
    relevant document, unjudged queries in the run, and runs both shorter and longer than 100 hits."""
    qrels, run = {}, {}
    for q in range(rng.randint(1, 25)):
        docs = [f"d{i}" for i in range(rng.randint(1, 180))]
        qid = f"q{q}"
        if rng.random() < 0.9:
            qrels[qid] = {
                d: rng.choice([-1, 0, 0, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, len(docs)))
            }
        if rng.random() < 0.9:
            # Few distinct scores, so ties are common and the tie order matters.
            run[qid] = {d: float(rng.randint(0, 15)) / 4 for d in rng.sample(docs, rng.randint(1, len(docs)))}
    if not qrels:
        qrels["q0"] = {"d0": 1}
    return run, qrels


def _trec_order(scores: dict[str, float]) -> list[str]:
    # trec_eval's ranking, written independently: score descending, then document id descending.
    return [doc for doc, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


@pytest.mark.parametrize("seed", range(8))
def test_retrieval_metrics_match_trec_eval(seed):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    run, qrels = _random_case(random.Random(seed))
    measures = {"ndcg_cut.10", "recall.10,100", "map_cut.100"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    # trec_eval's recip_rank has no cutoff: MRR@10 is recip_rank over each run's top 10 in trec_eval's order.
    top10 = {q: {d: scores[d] for d in _trec_order(scores)[:10]} for q, scores in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    expected = {}
    for name in RETRIEVAL_METRICS:
        # Mean over all judged queries; a judged query missing from the run scores 0 (trec_eval -c).
        values = [
            (rr[q]["recip_rank"] if name == "mrr@10" else per_query[q][TREC_MEASURES[name]])
            if q in per_query
            else 0
            for q in qrels
        ]
        expected[name] = sum(values) / len(qrels)
    got = retrieval_metrics(run, qrels)
    assert list(got) == list(RETRIEVAL_METRICS)
    for name in RETRIEVAL_METRICS:
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name


def test_perfect_and_worst_rankings():
    qrels = {"a": {"d1": 2, "d2": 1, "d3": 0}, "b": {"d4": 1}}
    perfect = {"a": {"d1": 3.0, "d2": 2.0, "d3": 1.0}, "b": {"d4": 1.0, "d1": 0.5}}
    assert retrieval_metrics(perfect, qrels) == dict.fromkeys(RETRIEVAL_METRICS, 1.0)
    nothing = {"a": {"d3": 1.0}}
    assert retrieval_metrics(nothing, qrels) == dict.fromkeys(RETRIEVAL_METRICS, 0.0)
    # d2 (gain 1) at rank 1 and d1 (gain 2) at rank 2: DCG = 1 + 2/log2(3), ideal = 2 + 1/log2(3).
    swapped = retrieval_metrics({"a": {"d2": 2.0, "d1": 1.0}}, {"a": qrels["a"]})
    assert swapped["ndcg@10"] == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    with pytest.raises(BidirError, match="qrels is empty"):
        retrieval_metrics(perfect, {})


@pytest.mark.parametrize("seed", range(3))
def test_correlations_match_scipy(seed):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 6, size=200) / 5  # many ties, as STS gold scores have
    pred = np.round(gold + rng.normal(0, 0.4, size=200), 1)  # ties on this side too
    assert spearman(pred, gold) == pytest.approx(stats.spearmanr(pred, gold).statistic, abs=1e-12)
    assert pearson(pred, gold) == pytest.approx(stats.pearsonr(pred, gold).statistic, abs=1e-12)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(BidirError, match="equal lengths"):
        spearman([1, 2, 3], [1, 2])


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
@pytest.mark.parametrize("k", [1, 10, 500])
def test_exact_search_matches_full_matrix(chunk_size, k):
    torch.manual_seed(chunk_size + k)
    queries, corpus = torch.randn(9, 16), torch.randn(300, 16)
    scores, indices = exact_search(queries, corpus, k, chunk_size=chunk_size)
    full = queries @ corpus.T  # (9, 300): random scores, so no ties
    want_scores, want_indices = full.topk(min(k, 300), dim=1)
    assert indices.shape == (9, min(k, 300)) and indices.dtype == torch.int64
    assert torch.equal(indices, want_indices)
    # The same dot products summed in another blocking order: equal up to fp32 rounding.
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_exact_search_breaks_ties_by_lower_index_and_orders_negative_scores():
    corpus = torch.tensor([[1.0], [-2.0], [1.0], [-0.5], [1.0], [-2.0]])
    queries = torch.tensor([[1.0], [-1.0]])
    scores, indices = exact_search(queries, corpus, 4, chunk_size=2)
    # Ties at the k-th place keep the lower index too, across chunk boundaries.
    assert indices.tolist() == [[0, 2, 4, 3], [1, 5, 3, 0]]
    assert scores.tolist() == [[1.0, 1.0, 1.0, -0.5], [2.0, 2.0, 0.5, -1.0]]


def test_exact_search_edge_cases():
    queries = torch.randn(3, 4)
    scores, indices = exact_search(queries, torch.zeros(0, 4), 5)
    assert scores.shape == indices.shape == (3, 0)
    assert exact_search(torch.zeros(0, 4), torch.randn(6, 4), 5)[1].shape == (0, 5)
    with pytest.raises(BidirError, match="k must be a positive integer"):
        exact_search(queries, torch.randn(6, 4), 0)
    with pytest.raises(BidirError, match=r"corpus chunk must be \(C, 4\)"):
        exact_search(queries, torch.randn(6, 5), 2)
