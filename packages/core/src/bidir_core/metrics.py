"""Retrieval metrics with trec_eval's conventions, and the correlations used for STS.

Retrieval (per query, then the mean over every query that has judgments; a judged query missing from the run
scores 0, as `trec_eval -c` does; queries without judgments are ignored):

- ranking: the run's documents sorted by score descending, ties broken by document id descending (the order
  trec_eval uses, so tied scores give the same numbers as trec_eval / pytrec_eval);
- relevant: relevance >= 1; relevance <= 0 is judged non-relevant (gain 0);
- nDCG@10: trec_eval's ndcg_cut.10 with linear gains, DCG = sum rel_i / log2(i + 1) over ranks i = 1..10, divided by
  the DCG of the judgments sorted by relevance (0 when the query has no relevant document);
- recall@k: relevant documents in the top k / all relevant documents of the query;
- MRR@10: 1 / rank of the first relevant document within the top 10, else 0;
- MAP@100: trec_eval's map_cut.100: the sum of precision@rank at each relevant document within the top 100,
  divided by all relevant documents of the query.
"""

from __future__ import annotations

import math

import numpy as np

from bidir_core.errors import BidirError

RETRIEVAL_METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10", "map@100")
TOP_K = 100
"""Documents a run keeps per query: the deepest cutoff of RETRIEVAL_METRICS."""


def ranked(scores: dict[str, float]) -> list[str]:
    """Document ids by score descending, ties by document id descending (trec_eval's order)."""
    by_id = sorted(scores, reverse=True)
    return sorted(by_id, key=lambda doc: -scores[doc])  # a stable sort keeps the id order within a tie


def query_metrics(scores: dict[str, float], judged: dict[str, int]) -> dict[str, float]:
    """The RETRIEVAL_METRICS of one query: its run (doc id -> score) against its judgments (doc id -> relevance)."""
    ranking = ranked(scores)
    gains = [max(judged.get(doc, 0), 0) for doc in ranking[:100]]
    n_relevant = sum(1 for rel in judged.values() if rel >= 1)
    ideal = sorted((rel for rel in judged.values() if rel > 0), reverse=True)[:10]
    ideal_dcg = _dcg(ideal)
    first = next((rank for rank, gain in enumerate(gains[:10], start=1) if gain > 0), None)
    hits, precision_sum = 0, 0.0
    for rank, gain in enumerate(gains, start=1):
        if gain > 0:
            hits += 1
            precision_sum += hits / rank
    return {
        "ndcg@10": _dcg(gains[:10]) / ideal_dcg if ideal_dcg > 0 else 0.0,
        "recall@10": sum(1 for g in gains[:10] if g > 0) / n_relevant if n_relevant else 0.0,
        "recall@100": hits / n_relevant if n_relevant else 0.0,
        "mrr@10": 1.0 / first if first else 0.0,
        "map@100": precision_sum / n_relevant if n_relevant else 0.0,
    }


def _dcg(gains: list[int]) -> float:
    return sum(gain / math.log2(rank + 1) for rank, gain in enumerate(gains, start=1))


def retrieval_metrics(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """Mean RETRIEVAL_METRICS (fractions) over the queries in qrels; run maps query id -> {doc id: score}."""
    if not qrels:
        raise BidirError("no judged queries to evaluate (qrels is empty)")
    totals = dict.fromkeys(RETRIEVAL_METRICS, 0.0)
    for query_id, judged in qrels.items():
        for name, value in query_metrics(run.get(query_id, {}), judged).items():
            totals[name] += value
    return {name: total / len(qrels) for name, total in totals.items()}


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length sequences (nan when either is constant)."""
    x, y = _pair(x, y)
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denominator if denominator > 0 else math.nan


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson of the ranks, tied values sharing their average rank."""
    x, y = _pair(x, y)
    return pearson(_average_ranks(x), _average_ranks(y))


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if len(x) != len(y):
        raise BidirError(f"correlation needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        raise BidirError(f"correlation needs at least 2 pairs, got {len(x)}")
    return x, y


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; each group of equal values gets the mean of the ranks it spans."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])  # first position of each group
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)  # mean of ranks start+1 .. end
    return ranks
