"""bidir_core.bm25: the run equals an independent Okapi BM25 computation (k1 1.5, b 0.75, rank_bm25's idf floor)
cut to the top k, ties keep the earlier document, and a missing rank_bm25 is one line saying what to install."""

from __future__ import annotations

import math
import re
import sys
from collections import Counter

import numpy as np
import pytest

from bidir_core.bm25 import bm25_run, evaluate_bm25
from bidir_core.datasets import RetrievalDataset
from bidir_core.errors import BidirError
from bidir_core.metrics import retrieval_metrics

WORDS = ["sort", "list", "dict", "file", "read", "write", "open", "socket", "thread", "lock", "queue", "time"]


def _dataset(seed=0) -> RetrievalDataset:
    rng = np.random.default_rng(seed)
    corpus = {f"d{i}": " ".join(rng.choice(WORDS, size=rng.integers(2, 7))).title() for i in range(30)}
    corpus["d30"] = corpus["d3"]  # a tie with an earlier document
    corpus["empty"] = ""
    queries = {f"q{i}": " ".join(rng.choice(WORDS, size=2)) + "!" for i in range(8)}
    queries["q8"] = corpus["d3"].lower()  # ranks d3 and its copy first
    qrels = {q: {f"d{(3 * i) % 31}": 1, f"d{(5 * i + 1) % 31}": 2} for i, q in enumerate(queries)}
    return RetrievalDataset("toy", corpus, queries, qrels)


def _okapi(corpus: list[str], query: str, k1=1.5, b=0.75, epsilon=0.25) -> list[float]:
    docs = [Counter(re.findall(r"\w+", t.lower()) or [""]) for t in corpus]
    lengths = [sum(d.values()) for d in docs]
    average = sum(lengths) / len(docs)
    df = Counter(w for d in docs for w in d)
    idf = {w: math.log(len(docs) - n + 0.5) - math.log(n + 0.5) for w, n in df.items()}
    floor = epsilon * sum(idf.values()) / len(idf)  # rank_bm25's floor for words in over half the documents
    idf = {w: v if v >= 0 else floor for w, v in idf.items()}
    return [
        sum(
            idf.get(w, 0.0) * d[w] * (k1 + 1) / (d[w] + k1 * (1 - b + b * n / average))
            for w in re.findall(r"\w+", query.lower())
        )
        for d, n in zip(docs, lengths, strict=True)
    ]


def test_run_is_okapi_bm25_top_k():
    data = _dataset()
    run = bm25_run(data, top_k=5)
    assert list(run) == list(data.qrels)
    doc_ids = list(data.corpus)
    for query_id, got in run.items():
        scores = _okapi(list(data.corpus.values()), data.queries[query_id])
        # best first; among equal scores the earlier document
        want = sorted(range(len(doc_ids)), key=lambda i: (-scores[i], i))[:5]
        assert list(got) == [doc_ids[i] for i in want]
        assert list(got.values()) == pytest.approx([scores[i] for i in want], abs=1e-9)
    assert list(run["q8"])[:2] == ["d3", "d30"]  # equal scores: the original before its later copy
    assert evaluate_bm25(data) == retrieval_metrics(bm25_run(data), data.qrels)


def test_bad_top_k_and_missing_rank_bm25(monkeypatch):
    data = _dataset()
    with pytest.raises(BidirError, match="top_k must be a positive integer, got 0"):
        bm25_run(data, top_k=0)
    monkeypatch.setitem(sys.modules, "rank_bm25", None)  # import rank_bm25 raises ImportError
    with pytest.raises(BidirError, match=r"BM25 needs rank_bm25: pip install 'bidir-core\[bm25\]'"):
        bm25_run(data)
    bad = RetrievalDataset("bad", data.corpus, {}, data.qrels)
    with pytest.raises(BidirError, match="bad: 9 judged queries have no text, e.g. 'q0'"):
        bm25_run(bad)
