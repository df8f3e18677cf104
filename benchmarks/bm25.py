"""BM25, the lexical baseline every trained row is read against: rank_bm25's BM25Okapi over lowercase word tokens
(\\w+), scored by bidir_core.metrics like the models. Used by quality_baselines.py, quality.py and tools/demo.py.

- retrieval: each judged query against the whole corpus, the top TOP_K kept (bidir_core.evaluation's cut).
- STS: the BM25 score of each sentence against the other (both directions averaged) over an index of all the
  pairs' sentences; Spearman against the gold scores.
"""

from __future__ import annotations

import re

import numpy as np
from rank_bm25 import BM25Okapi

from bidir_core.datasets import RetrievalDataset, StsPair
from bidir_core.evaluation import TOP_K
from bidir_core.metrics import retrieval_metrics, spearman


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def bm25_retrieval(data: RetrievalDataset) -> dict[str, float]:
    doc_ids = list(data.corpus)
    index = BM25Okapi([words(data.corpus[d]) or [""] for d in doc_ids])
    run = {}
    for query_id in data.qrels:
        scores = index.get_scores(words(data.queries[query_id]))
        top = np.argsort(-scores, kind="stable")[:TOP_K]
        run[query_id] = {doc_ids[i]: float(scores[i]) for i in top}
    return retrieval_metrics(run, data.qrels)


def bm25_sts(pairs: list[StsPair]) -> dict[str, float]:
    sentences = list(dict.fromkeys(s for p in pairs for s in (p.sentence1, p.sentence2)))
    row = {s: i for i, s in enumerate(sentences)}
    index = BM25Okapi([words(s) or [""] for s in sentences])
    sims = [
        (
            index.get_scores(words(p.sentence1))[row[p.sentence2]]
            + index.get_scores(words(p.sentence2))[row[p.sentence1]]
        )
        / 2
        for p in pairs
    ]
    return {"spearman": spearman(sims, [p.score for p in pairs])}
