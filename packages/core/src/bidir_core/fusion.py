"""Hybrid retrieval: fusing the runs of several first stages (dense and BM25) into one run.

Two rules, the two the hybrid-search engines offer (Elasticsearch's and OpenSearch's RRF and their normalized linear
combination, Vespa's and Weaviate's likewise):

- `rrf` (reciprocal-rank fusion, Cormack et al. 2009): a document's score is sum over runs of 1 / (k + rank), its
  1-based rank in each run that holds it (k = 60, the paper's). Ranks only, so the scores' scales never matter.
- `weighted`: a weighted sum of each run's scores min-max normalized per query to [0, 1] (a document a run does not
  hold gets 0 there). Uses how far apart the scores are, which ranks throw away, but depends on their scale.

A run holds each query's top documents only (bidir_core.metrics.TOP_K), so a document beyond one run's depth counts
as absent from it; the fused run keeps the `top_k` best. Which rule does better is measured in the README (Hybrid
retrieval).

The same rules fuse a reranker's scores with the first stage's over the documents it reranked (fuse_reranked):
score interpolation, which keeps the first stage's evidence where the reranker is unsure.
"""

from __future__ import annotations

import math

from bidir_core.errors import BidirError
from bidir_core.metrics import TOP_K, ranked

Run = dict[str, dict[str, float]]

FUSIONS = ("weighted", "rrf")
RRF_K = 60


def check_fusion(fusion: str, what: str = "fusion") -> None:
    """Refuse a fusion rule outside FUSIONS in one line naming `what` asked for it."""
    if fusion not in FUSIONS:
        raise BidirError(f"{what} must be one of {', '.join(FUSIONS)}, got {fusion!r}")


def fuse(
    runs: list[Run], fusion: str = "rrf", *, weights: list[float] | None = None, top_k: int = TOP_K
) -> Run:
    """One run from several ({query id: {doc id: score}} each) by `fusion` (FUSIONS); `weights` (one per run,
    default equal) scale each run's part in either rule. Queries are the union of the runs' queries."""
    check_fusion(fusion)
    if not runs:
        raise BidirError("fusion needs at least one run")
    weights = [1.0] * len(runs) if weights is None else weights
    if len(weights) != len(runs) or not all(
        isinstance(w, int | float) and math.isfinite(w) and w >= 0 for w in weights
    ):
        raise BidirError(f"fusion weights must be {len(runs)} finite non-negative numbers, got {weights!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise BidirError(f"top_k must be a positive integer, got {top_k!r}")
    part = _rrf_part if fusion == "rrf" else _normalized
    fused: Run = {}
    for query_id in dict.fromkeys(q for run in runs for q in run):
        scores: dict[str, float] = {}
        for run, weight in zip(runs, weights, strict=True):
            for doc_id, value in part(run.get(query_id, {})).items():
                scores[doc_id] = scores.get(doc_id, 0.0) + weight * value
        fused[query_id] = {doc_id: scores[doc_id] for doc_id in ranked(scores)[:top_k]}
    return fused


def _rrf_part(scores: dict[str, float]) -> dict[str, float]:
    return {doc_id: 1.0 / (RRF_K + rank) for rank, doc_id in enumerate(ranked(scores), start=1)}


def _normalized(scores: dict[str, float]) -> dict[str, float]:
    """Scores min-max scaled to [0, 1]; a run whose scores are all equal gives each of its documents 1."""
    if not scores:
        return {}
    if not all(math.isfinite(s) for s in scores.values()):
        raise BidirError("fusion: a run holds a non-finite (nan/inf) score")
    low, high = min(scores.values()), max(scores.values())
    if high == low:
        return dict.fromkeys(scores, 1.0)
    return {doc_id: (s - low) / (high - low) for doc_id, s in scores.items()}


def fuse_reranked(reranked: Run, first_stage: Run, fusion: str = "weighted") -> Run:
    """A reranked run fused, with equal weights, with the first stage's scores of the same documents: each query's
    documents are the ones the reranker scored (its top k of first_stage), so no document enters or leaves."""
    top_k = max((len(scores) for scores in reranked.values()), default=1) or 1
    first = {}
    for query_id, scores in reranked.items():
        stage = first_stage.get(query_id, {})
        if missing := [doc_id for doc_id in scores if doc_id not in stage]:
            raise BidirError(
                f"fusion: the reranked run of query {query_id!r} holds document {missing[0]!r}, which its first "
                "stage does not"
            )
        first[query_id] = {doc_id: stage[doc_id] for doc_id in scores}
    return fuse([reranked, first], fusion, top_k=top_k)
