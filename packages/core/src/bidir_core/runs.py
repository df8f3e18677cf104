"""Runs: {query id: {doc id: score}}, a first stage's best documents for each judged query of a RetrievalDataset,
the thing bidir_core.metrics scores and a reranker reorders.

First stages: an embedder (exact search over the embedded corpus, or over corpus embeddings batch-embed wrote) here,
BM25 in bm25.py. A reranker (a cross-encoder) rescores each query's top documents of a run: rerank_run.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from bidir_core.datasets import RetrievalDataset
from bidir_core.embeddings_artifact import Embeddings
from bidir_core.errors import BidirError
from bidir_core.metrics import TOP_K, ranked
from bidir_core.search import RunningTopK

Run = dict[str, dict[str, float]]
RERANK_TOP_K = 50
"""Documents of each query's run a reranker scores unless told otherwise (bidir-eval --rerank-top-k)."""


@contextlib.contextmanager
def evaluating(model):
    """eval() mode and no autograd for the duration; a model that was training is put back into train()."""
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def progress_option(show: bool) -> dict:
    # Only asked for when wanted: a model other than bidir's own need not know show_progress_bar.
    return {"show_progress_bar": True} if show else {}


def finite(embeddings: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(embeddings).all():
        raise BidirError(f"{what}: the model produced non-finite (nan/inf) embeddings")
    return embeddings


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BidirError(f"{name} must be a positive integer, got {value!r}")


def embedder_run(
    encoder,
    dataset: RetrievalDataset,
    *,
    top_k: int = TOP_K,
    batch_size: int = 32,
    dim: int | None = None,
    corpus_chunk: int = 50_000,
    corpus_embeddings: Embeddings | None = None,
    progress: bool = False,
) -> Run:
    """The run of an encoder (BiEncoder's encode_queries / encode_documents): each judged query's top_k documents by
    cosine similarity.

    The corpus is embedded corpus_chunk documents at a time and each chunk is searched right away (a running
    top-k per query), so memory holds the query embeddings and one chunk, never the whole corpus's embeddings.
    With corpus_embeddings (an embeddings folder written by batch-embed, read with read_embeddings) the corpus is
    not embedded again: its shards are searched one at a time instead, and only the queries go through encoder.
    """
    _positive("corpus_chunk", corpus_chunk)
    _positive("top_k", top_k)
    query_ids = dataset.judged_queries()
    doc_ids = list(dataset.corpus)
    options = {"batch_size": batch_size, "dim": dim, "normalize": True, **progress_option(progress)}
    with evaluating(encoder):
        queries = finite(
            encoder.encode_queries([dataset.queries[q] for q in query_ids], **options), dataset.name
        )
        top = RunningTopK(torch.from_numpy(queries), top_k)
        if corpus_embeddings is not None:
            doc_ids = _search_written(top, corpus_embeddings, dataset, queries.shape[1])
        else:
            for start in range(0, len(doc_ids), corpus_chunk):
                texts = [dataset.corpus[d] for d in doc_ids[start : start + corpus_chunk]]
                top.add(torch.from_numpy(finite(encoder.encode_documents(texts, **options), dataset.name)))
    scores, indices = top.result()  # (Q, min(top_k, N)), best first
    return {
        query_id: {doc_ids[i]: s for i, s in zip(row_indices.tolist(), row_scores.tolist(), strict=True)}
        for query_id, row_scores, row_indices in zip(query_ids, scores, indices, strict=True)
    }


def _search_written(top: RunningTopK, written: Embeddings, dataset: RetrievalDataset, dim: int) -> list[str]:
    """Search the shards of an embeddings folder; returns the document ids in the order they were searched.
    Rows whose id is not in the dataset's corpus are skipped; a corpus document without a row is an error."""
    stored = written.manifest.dim
    if stored < dim:
        raise BidirError(
            f"{written.folder}: embeddings have dim {stored}, the queries {dim}; evaluate with --dim {stored}"
        )
    doc_ids: list[str] = []
    for shard, (ids, emb) in zip(written.manifest.shards, written.iter_shards(), strict=True):
        if not np.isfinite(emb).all():
            row = int(np.flatnonzero(~np.isfinite(emb).all(axis=1))[0])
            raise BidirError(
                f"{written.folder / shard.name}: non-finite (nan/inf) embeddings, the first of id {ids[row]!r}; "
                "embed the corpus again with a working model"
            )
        keep = [i for i, doc_id in enumerate(ids) if doc_id in dataset.corpus]
        # (n, stored) float16/32 -> (n, dim) float32, re-normalized: a prefix of a normalized vector is not
        chunk = torch.from_numpy(np.asarray(emb[keep, :dim], dtype=np.float32))
        top.add(torch.nn.functional.normalize(chunk, dim=-1))
        doc_ids += [ids[i] for i in keep]
    found = set(doc_ids)
    if len(found) < len(dataset.corpus):
        absent = next(d for d in dataset.corpus if d not in found)
        raise BidirError(
            f"{written.folder}: {len(dataset.corpus) - len(found)} of the {len(dataset.corpus)} documents "
            f"of {dataset.name} have no embedding there, e.g. id {absent!r}"
        )
    return doc_ids


def rerank_run(
    cross_encoder,
    dataset: RetrievalDataset,
    run: Run,
    top_k: int,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> Run:
    """The run reordered by a cross-encoder: each query's top_k documents of run (in metrics' ranking order)
    scored as (query, document) pairs by cross_encoder.predict, raw logits as scores. Documents below top_k are
    dropped, and a relevant document the run missed stays missed. A blank document (no title, no text: a reranker
    has nothing to read) is left out of the reranked run, as a miss, with one warning. All queries' pairs go to one
    predict call, so its length-sorted batches mix queries."""
    _positive("top_k", top_k)
    keys: list[tuple[str, str]] = []
    blank: dict[str, None] = {}  # distinct blank document ids, first seen first (one may top many queries)
    for query_id, scores in run.items():
        if query_id not in dataset.queries:
            raise BidirError(f"{dataset.name}: the run ranks query {query_id!r}, which has no text there")
        for doc_id in ranked(scores)[:top_k]:
            if doc_id not in dataset.corpus:
                raise BidirError(
                    f"{dataset.name}: the run of query {query_id!r} holds document {doc_id!r}, not in the corpus"
                )
            if dataset.corpus[doc_id].strip():
                keys.append((query_id, doc_id))
            else:
                blank[doc_id] = None
    if blank:
        warnings.warn(
            f"{dataset.name}: {len(blank)} blank documents in the runs' top {top_k} (e.g. {next(iter(blank))!r}) "
            "were not reranked and are left out of the reranked run",
            stacklevel=2,
        )
    reranked: Run = {query_id: {} for query_id in run}
    if not keys:
        return reranked
    pairs = [(dataset.queries[q], dataset.corpus[d]) for q, d in keys]
    with evaluating(cross_encoder):
        logits = cross_encoder.predict(pairs, batch_size=batch_size, **progress_option(progress))
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape != (len(pairs),):
        raise BidirError(f"the reranker gave {logits.shape} scores for {len(pairs)} pairs")
    if not np.isfinite(logits).all():
        query_id, doc_id = keys[int(np.flatnonzero(~np.isfinite(logits))[0])]
        raise BidirError(
            f"{dataset.name}: the reranker produced a non-finite (nan/inf) score, the first for query {query_id!r} "
            f"and document {doc_id!r}"
        )
    for (query_id, doc_id), logit in zip(keys, logits.tolist(), strict=True):
        reranked[query_id][doc_id] = logit
    return reranked
