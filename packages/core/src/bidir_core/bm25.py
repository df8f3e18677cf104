"""BM25 as a first stage: rank_bm25's BM25Okapi over lowercase word tokens (\\w+), the lexical baseline every
model is read against and a first stage a reranker can reorder (bidir-eval bm25 ...).

rank_bm25 is an optional dependency: pip install 'bidir-core[bm25]'.
"""

from __future__ import annotations

import re

import numpy as np

from bidir_core.datasets import RetrievalDataset
from bidir_core.errors import BidirError
from bidir_core.metrics import TOP_K, retrieval_metrics


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def bm25_index(texts: list[str]):
    """A BM25Okapi index over the texts' words; a text without any word is one empty token (rank_bm25 needs one)."""
    try:
        from rank_bm25 import BM25Okapi
    except ImportError:
        raise BidirError("BM25 needs rank_bm25: pip install 'bidir-core[bm25]'") from None
    return BM25Okapi([words(t) or [""] for t in texts])


def bm25_run(dataset: RetrievalDataset, top_k: int = TOP_K) -> dict[str, dict[str, float]]:
    """The run of BM25 on the dataset: each judged query against the whole corpus, its top_k documents by score
    ({query id: {doc id: score}}); among equal scores the earlier corpus document is kept, as exact search does."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise BidirError(f"top_k must be a positive integer, got {top_k!r}")
    query_ids = dataset.judged_queries()
    doc_ids = list(dataset.corpus)
    index = bm25_index([dataset.corpus[d] for d in doc_ids])
    run = {}
    for query_id in query_ids:
        scores = index.get_scores(words(dataset.queries[query_id]))
        top = np.argsort(-scores, kind="stable")[:top_k]
        run[query_id] = {doc_ids[i]: float(scores[i]) for i in top}
    return run


def evaluate_bm25(dataset: RetrievalDataset) -> dict[str, float]:
    """RETRIEVAL_METRICS of BM25 on the dataset's judged queries (bidir-eval bm25 --retrieval DATA)."""
    return retrieval_metrics(bm25_run(dataset), dataset.qrels)
