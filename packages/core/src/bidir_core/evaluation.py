"""Evaluating an encoder: retrieval on a RetrievalDataset (exact search + trec_eval-style metrics) and STS
correlation. Works on any encoder with BiEncoder's encode_queries / encode_documents (e.g. during training).

Embeddings are L2-normalized, so every score is a cosine similarity. Queries get the model's query prefix and
documents its passage prefix; both sentences of an STS pair get the query prefix (a symmetric task, as E5 does).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from bidir_core.datasets import RetrievalDataset, StsPair
from bidir_core.errors import BidirError
from bidir_core.metrics import RETRIEVAL_METRICS, pearson, retrieval_metrics, spearman
from bidir_core.search import RunningTopK, exact_search

__all__ = [
    "RETRIEVAL_METRICS",
    "evaluate_retrieval",
    "evaluate_sts",
    "exact_search",
    "retrieval_metrics",
]

TOP_K = 100
"""Hits kept per query: the deepest cutoff of RETRIEVAL_METRICS."""


@contextlib.contextmanager
def evaluating(encoder):
    """eval() mode and no autograd for the duration; a model that was training is put back into train()."""
    was_training = bool(getattr(encoder, "training", False))
    if hasattr(encoder, "eval"):
        encoder.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            encoder.train()


def evaluate_retrieval(
    encoder,
    dataset: RetrievalDataset,
    *,
    batch_size: int = 32,
    dim: int | None = None,
    corpus_chunk: int = 50_000,
) -> dict[str, float]:
    """RETRIEVAL_METRICS of the encoder on the dataset's judged queries.

    The corpus is embedded corpus_chunk documents at a time and each chunk is searched right away (a running
    top-100 per query), so memory holds the query embeddings and one chunk, never the whole corpus's embeddings.
    """
    if isinstance(corpus_chunk, bool) or not isinstance(corpus_chunk, int) or corpus_chunk < 1:
        raise BidirError(f"corpus_chunk must be a positive integer, got {corpus_chunk!r}")
    missing = [q for q in dataset.qrels if q not in dataset.queries]
    if missing:
        raise BidirError(f"{dataset.name}: {len(missing)} judged queries have no text, e.g. {missing[0]!r}")
    query_ids = list(dataset.qrels)
    doc_ids = list(dataset.corpus)
    options = {"batch_size": batch_size, "dim": dim, "normalize": True}
    with evaluating(encoder):
        queries = _finite(encoder.encode_queries([dataset.queries[q] for q in query_ids], **options), dataset)
        top = RunningTopK(torch.from_numpy(queries), TOP_K)
        for start in range(0, len(doc_ids), corpus_chunk):
            texts = [dataset.corpus[d] for d in doc_ids[start : start + corpus_chunk]]
            top.add(torch.from_numpy(_finite(encoder.encode_documents(texts, **options), dataset)))
    scores, indices = top.result()  # (Q, min(100, N)), best first
    run = {
        query_id: {doc_ids[i]: s for i, s in zip(row_indices.tolist(), row_scores.tolist(), strict=True)}
        for query_id, row_scores, row_indices in zip(query_ids, scores, indices, strict=True)
    }
    return retrieval_metrics(run, dataset.qrels)


def evaluate_sts(
    encoder, pairs: list[StsPair], *, batch_size: int = 32, dim: int | None = None
) -> dict[str, float]:
    """Spearman and Pearson correlation between the gold scores and the cosine similarity of each pair."""
    if len(pairs) < 2:
        raise BidirError(f"STS evaluation needs at least 2 pairs, got {len(pairs)}")
    sentences = list(dict.fromkeys(s for pair in pairs for s in (pair.sentence1, pair.sentence2)))
    row = {s: i for i, s in enumerate(sentences)}  # each distinct sentence is embedded once
    with evaluating(encoder):
        emb = _finite(
            encoder.encode_queries(sentences, batch_size=batch_size, dim=dim, normalize=True), "STS"
        )
    first = emb[[row[p.sentence1] for p in pairs]].astype(np.float64)  # (P, D)
    second = emb[[row[p.sentence2] for p in pairs]].astype(np.float64)
    cosine = (first * second).sum(axis=1)
    gold = [p.score for p in pairs]
    return {"spearman": spearman(cosine, gold), "pearson": pearson(cosine, gold)}


def _finite(embeddings: np.ndarray, what) -> np.ndarray:
    if not np.isfinite(embeddings).all():
        name = what.name if isinstance(what, RetrievalDataset) else what
        raise BidirError(f"{name}: the model produced non-finite (nan/inf) embeddings")
    return embeddings
