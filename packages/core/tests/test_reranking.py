"""runs.rerank_run: reranking a run equals scoring each (query, document) pair alone and sorting; the reranked
run's metrics are trec_eval's; documents below top_k are dropped and a positive the first stage missed stays a
miss; bad runs and non-finite scores are one line naming what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from bidir_core.cross_encoder import CrossEncoder
from bidir_core.datasets import RetrievalDataset
from bidir_core.errors import BidirError
from bidir_core.metrics import ranked, retrieval_metrics
from bidir_core.runs import rerank_run

WORDS = ["sort", "list", "dict", "file", "read", "write", "open", "socket", "thread", "lock", "queue", "time"]


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    from bidir_core.testing import write_hf_llama

    folder = write_hf_llama(tmp_path_factory.mktemp("rr") / "decoder")
    return CrossEncoder.from_pretrained(folder, new_head=True, seed=0)


def _dataset(n_docs=12, n_queries=4, seed=0) -> RetrievalDataset:
    rng = np.random.default_rng(seed)
    # lengths from 1 to 20 words, so the length-sorted batches of predict mix queries and cut pairs apart
    corpus = {f"d{i}": " ".join(rng.choice(WORDS, size=rng.integers(1, 20))) for i in range(n_docs)}
    queries = {f"q{i}": " ".join(rng.choice(WORDS, size=rng.integers(1, 5))) for i in range(n_queries)}
    qrels = {q: {f"d{(2 * i) % n_docs}": 2, f"d{(3 * i + 1) % n_docs}": 1} for i, q in enumerate(queries)}
    return RetrievalDataset("toy", corpus, queries, qrels)


def _first_stage(data: RetrievalDataset, seed=1) -> dict[str, dict[str, float]]:
    """A run of random scores over 8 of the 12 documents per query, as a weak first stage would give."""
    rng = np.random.default_rng(seed)
    doc_ids = list(data.corpus)
    return {
        q: {doc_ids[i]: float(rng.normal()) for i in rng.choice(len(doc_ids), size=8, replace=False)}
        for q in data.qrels
    }


def test_rerank_equals_scoring_each_pair_alone(cross_encoder):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    data = _dataset()
    run = _first_stage(data)
    got = rerank_run(cross_encoder, data, run, top_k=5, batch_size=3)
    assert list(got) == list(run)
    for query_id, scores in got.items():
        kept = ranked(run[query_id])[:5]  # the first stage's top 5, in the metrics' order
        alone = {d: float(cross_encoder.predict([(data.queries[query_id], data.corpus[d])])[0]) for d in kept}
        assert set(scores) == set(kept)
        assert scores == pytest.approx(alone, abs=1e-5)
        assert ranked(scores) == sorted(alone, key=lambda d: -alone[d])  # no near-ties among random logits
    trec = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10", "recall.10", "map_cut.100"}).evaluate(
        got
    )
    metrics = retrieval_metrics(got, data.qrels)
    for ours, theirs in [("ndcg@10", "ndcg_cut_10"), ("recall@10", "recall_10"), ("map@100", "map_cut_100")]:
        assert metrics[ours] == pytest.approx(np.mean([trec[q][theirs] for q in data.qrels]), abs=1e-6), ours


def test_missed_positive_stays_a_miss(cross_encoder):
    data = _dataset()
    query_id, (best, other) = "q0", list(data.qrels["q0"])
    missed = {d: 1.0 / (i + 1) for i, d in enumerate(d for d in data.corpus if d not in (best, other))}
    below = {**missed, best: -1.0}  # the positive is in the run, but below the top 3
    for run in ({query_id: missed}, {query_id: below}):
        got = rerank_run(cross_encoder, data, run, top_k=3)
        assert best not in got[query_id] and other not in got[query_id] and len(got[query_id]) == 3
        assert retrieval_metrics(got, {query_id: data.qrels[query_id]})["recall@100"] == 0.0
    # With the positive within the top k it is scored, and found
    got = rerank_run(cross_encoder, data, {query_id: {**missed, best: 9.0}}, top_k=3)
    assert (
        best in got[query_id]
        and retrieval_metrics(got, {query_id: data.qrels[query_id]})["recall@100"] == 0.5
    )


def test_bad_runs_and_scores_are_one_line(cross_encoder, monkeypatch):
    data = _dataset()
    with pytest.raises(BidirError, match="top_k must be a positive integer, got 0"):
        rerank_run(cross_encoder, data, _first_stage(data), top_k=0)
    with pytest.raises(BidirError, match="toy: the run ranks query 'q9', which has no text there"):
        rerank_run(cross_encoder, data, {"q9": {"d0": 1.0}}, top_k=5)
    with pytest.raises(
        BidirError, match="toy: the run of query 'q1' holds document 'd99', not in the corpus"
    ):
        rerank_run(cross_encoder, data, {"q1": {"d0": 1.0, "d99": 2.0}}, top_k=5)
    assert rerank_run(cross_encoder, data, {"q1": {}}, top_k=5) == {"q1": {}}

    def nan_for_d2(pairs, **_):
        return np.array([np.nan if p[1] == data.corpus["d2"] else 0.0 for p in pairs], np.float32)

    monkeypatch.setattr(cross_encoder, "predict", nan_for_d2)
    with pytest.raises(BidirError, match="non-finite .* the first for query 'q1' and document 'd2'"):
        rerank_run(cross_encoder, data, {"q0": {"d1": 1.0}, "q1": {"d0": 1.0, "d2": 0.5}}, top_k=5)


def test_blank_documents_are_left_out_with_a_warning(cross_encoder):
    """A corpus may hold documents with no text (Cranfield has two); an embedder ranks them, a reranker cannot read
    them: they leave the reranked run (a miss) and the other pairs are scored as before."""
    data = _dataset()
    data.corpus["d3"] = "  "
    run = {"q0": {"d3": 9.0, "d1": 2.0, "d2": 1.0}, "q1": {"d0": 1.0, "d3": 0.5}}  # d3 counted once
    with pytest.warns(UserWarning, match=r"toy: 1 blank documents in the runs' top 5 \(e\.g\. 'd3'\)"):
        got = rerank_run(cross_encoder, data, run, top_k=5)
    assert set(got["q0"]) == {"d1", "d2"} and set(got["q1"]) == {"d0"}
    assert got == rerank_run(cross_encoder, data, {"q0": {"d1": 2.0, "d2": 1.0}, "q1": {"d0": 1.0}}, top_k=5)
