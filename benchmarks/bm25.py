"""BM25 on STS, for the quality tables: the BM25 score of each sentence against the other (both directions
averaged) over an index of all the pairs' sentences; Spearman against the gold scores. Retrieval's BM25 is
bidir_core.bm25 (evaluate_bm25; bidir-eval bm25), over the same index and words.
"""

from __future__ import annotations

from bidir_core.bm25 import bm25_index, words
from bidir_core.datasets import StsPair
from bidir_core.metrics import spearman


def bm25_sts(pairs: list[StsPair]) -> dict[str, float]:
    sentences = list(dict.fromkeys(s for p in pairs for s in (p.sentence1, p.sentence2)))
    row = {s: i for i, s in enumerate(sentences)}
    index = bm25_index(sentences)
    sims = [
        (
            index.get_scores(words(p.sentence1))[row[p.sentence2]]
            + index.get_scores(words(p.sentence2))[row[p.sentence1]]
        )
        / 2
        for p in pairs
    ]
    return {"spearman": spearman(sims, [p.score for p in pairs])}
