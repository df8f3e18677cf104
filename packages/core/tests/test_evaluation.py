"""evaluate_retrieval / evaluate_sts: the same numbers as an independent full-matrix computation, bounded corpus
chunks change nothing, prefixes are used, and the model's train/eval mode is restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bidir_core.checkpoint import EncoderConfig
from bidir_core.datasets import RetrievalDataset, StsPair
from bidir_core.errors import BidirError
from bidir_core.evaluation import evaluate_retrieval, evaluate_sts
from bidir_core.metrics import RETRIEVAL_METRICS
from bidir_core.testing import tiny_encoder

WORDS = ["sort", "list", "dict", "file", "read", "write", "open", "socket", "thread", "lock", "queue", "time"]
WORDS += ["date", "path", "json", "parse"]


def _dataset(n_docs=40, n_queries=12, seed=0) -> RetrievalDataset:
    rng = np.random.default_rng(seed)
    corpus = {f"d{i}": " ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for i in range(n_docs)}
    queries = {f"q{i}": " ".join(rng.choice(WORDS, size=3)) for i in range(n_queries)}
    qrels = {
        q: {
            f"d{j}": int(rng.integers(0, 3))
            for j in rng.choice(n_docs, size=rng.integers(1, 4), replace=False)
        }
        for q in queries
    }
    return RetrievalDataset("toy", corpus, queries, qrels)


def test_evaluate_retrieval_matches_full_matrix_and_trec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    encoder, data = tiny_encoder(EncoderConfig(query_prefix="Q: ", passage_prefix="P: ")), _dataset()
    got = evaluate_retrieval(encoder, data, batch_size=5, corpus_chunk=7)
    assert evaluate_retrieval(encoder, data, corpus_chunk=1000) == pytest.approx(got, abs=1e-6)
    # Independently: embed with the prefixes, score the full matrix, keep every document, trec_eval the run.
    q = encoder.encode(["Q: " + t for t in data.queries.values()], normalize=True)
    d = encoder.encode(["P: " + t for t in data.corpus.values()], normalize=True)
    scores = q @ d.T  # (Q, N) cosine similarities
    run = {
        qid: dict(zip(data.corpus, map(float, row), strict=True))
        for qid, row in zip(data.queries, scores, strict=True)
    }
    trec = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10", "recall.10", "map_cut.100"}).evaluate(
        run
    )
    for ours, theirs in [("ndcg@10", "ndcg_cut_10"), ("recall@10", "recall_10"), ("map@100", "map_cut_100")]:
        assert got[ours] == pytest.approx(np.mean([trec[q][theirs] for q in data.qrels]), abs=1e-5), ours
    assert got["recall@100"] == pytest.approx(
        np.mean([float(any(r > 0 for r in j.values())) for j in data.qrels.values()])
    )


class OneHot(torch.nn.Module):
    """A perfect retriever: query i and the one document about item i share the i-th basis vector."""

    def __init__(self):
        super().__init__()
        self.modes_seen = []

    def _embed(self, texts, dim=None, **_):
        self.modes_seen.append((self.training, torch.is_grad_enabled()))
        return np.eye(8, dtype=np.float32)[[int(t.split()[-1]) for t in texts]][:, :dim]

    encode_queries = encode_documents = _embed


def test_perfect_retriever_scores_one_and_mode_is_restored():
    data = RetrievalDataset(
        "onehot",
        corpus={f"d{i}": f"doc {i}" for i in range(8)},
        queries={f"q{i}": f"query {i}" for i in range(5)},
        qrels={f"q{i}": {f"d{i}": 1} for i in range(5)},
    )
    encoder = OneHot().train()
    assert evaluate_retrieval(encoder, data, corpus_chunk=3) == dict.fromkeys(RETRIEVAL_METRICS, 1.0)
    assert encoder.training  # put back into train mode for the training loop
    assert set(encoder.modes_seen) == {(False, False)}  # embedded in eval mode, without autograd
    shuffled = RetrievalDataset(
        "off", data.corpus, data.queries, {f"q{i}": {f"d{(i + 1) % 8}": 1} for i in range(5)}
    )
    metrics = evaluate_retrieval(encoder.eval(), shuffled)
    assert metrics["mrr@10"] < 1 and metrics["recall@100"] == 1.0
    assert not encoder.training


def test_evaluate_retrieval_errors():
    data = _dataset()
    bad = RetrievalDataset("bad", data.corpus, {}, data.qrels)
    with pytest.raises(BidirError, match="judged queries have no text"):
        evaluate_retrieval(tiny_encoder(), bad)
    with pytest.raises(BidirError, match="corpus_chunk must be a positive integer"):
        evaluate_retrieval(tiny_encoder(), data, corpus_chunk=0)


def test_evaluate_sts_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    encoder = tiny_encoder().train()
    sentences = [" ".join(WORDS[i : i + 3]) for i in range(12)]
    pairs = [StsPair(sentences[i], sentences[(i * 5 + 1) % 12], float(i % 4)) for i in range(12)]
    got = evaluate_sts(encoder, pairs, dim=32)
    assert encoder.training
    emb = encoder.encode(["query: " + s for s in sentences], dim=32)  # query prefix on both sides
    emb = {s: e / np.linalg.norm(e) for s, e in zip(sentences, emb, strict=True)}
    cos = [float(emb[p.sentence1] @ emb[p.sentence2]) for p in pairs]
    gold = [p.score for p in pairs]
    assert got["spearman"] == pytest.approx(stats.spearmanr(cos, gold).statistic, abs=1e-5)
    assert got["pearson"] == pytest.approx(stats.pearsonr(cos, gold).statistic, abs=1e-5)


def _write_corpus_embeddings(folder, ids, embeddings, shard_size=9):
    from bidir_core.embeddings_artifact import (
        EmbeddingsManifest,
        Shard,
        write_embeddings_manifest,
        write_shard,
    )

    folder.mkdir()
    shards = []
    for index, start in enumerate(range(0, len(ids), shard_size)):
        path = write_shard(
            folder, index, ids[start : start + shard_size], embeddings[start : start + shard_size]
        )
        shards.append(Shard(path.name, len(ids[start : start + shard_size])))
    write_embeddings_manifest(
        folder,
        EmbeddingsManifest(
            model="tiny",
            model_fingerprint="sha256:00",
            dim=embeddings.shape[1],
            dtype=str(embeddings.dtype),
            normalize=True,
            prompt="passage",
            prefix="P: ",
            input_fingerprint="sha256:11",
            shards=tuple(shards),
            complete=True,
        ),
    )


def test_written_corpus_embeddings_score_like_the_model(tmp_path):
    from bidir_core.embeddings_artifact import read_embeddings

    encoder, data = tiny_encoder(EncoderConfig(query_prefix="Q: ", passage_prefix="P: ")), _dataset()
    expected = evaluate_retrieval(encoder, data)
    # The corpus as batch-embed would write it (shuffled, plus rows that are not in the dataset), in float16.
    ids = list(data.corpus)[::-1] + ["extra-1", "extra-2"]
    emb = encoder.encode_documents([data.corpus.get(i, "unrelated text") for i in ids], normalize=True)
    _write_corpus_embeddings(tmp_path / "f32", ids, emb)
    got = evaluate_retrieval(encoder, data, corpus_embeddings=read_embeddings(tmp_path / "f32"))
    assert got == pytest.approx(expected, abs=1e-6)
    _write_corpus_embeddings(tmp_path / "f16", ids, emb.astype(np.float16))
    got = evaluate_retrieval(encoder, data, corpus_embeddings=read_embeddings(tmp_path / "f16"))
    assert got == pytest.approx(expected, abs=0.05)  # float16 storage: near-ties may swap

    # Matryoshka: a written prefix width is searched with queries of the same width, both re-normalized.
    assert evaluate_retrieval(
        encoder, data, dim=16, corpus_embeddings=read_embeddings(tmp_path / "f32")
    ) == pytest.approx(evaluate_retrieval(encoder, data, dim=16), abs=1e-6)
    _write_corpus_embeddings(tmp_path / "narrow", ids, emb[:, :16].copy())
    with pytest.raises(BidirError, match="embeddings have dim 16, the queries 64; evaluate with --dim 16"):
        evaluate_retrieval(encoder, data, corpus_embeddings=read_embeddings(tmp_path / "narrow"))

    _write_corpus_embeddings(tmp_path / "partial", ids[3:], emb[3:])
    with pytest.raises(
        BidirError, match=r"3 of the 40 documents of toy have no embedding there, e.g. id 'd37'"
    ):
        evaluate_retrieval(encoder, data, corpus_embeddings=read_embeddings(tmp_path / "partial"))
