"""Round-trip filtering of synthetic queries: keep a (query, passage) pair only when the passage it was generated
from comes back for the query.

Why: a generated query can be too vague (it matches half the corpus) or about something the passage does not say;
training on it teaches the model noise. The check (round-trip consistency, as Promptagator filters its
queries): the passage must rank in the top k of the whole corpus under an embedder (exact search);
with a reranker, it must also rank in the top k when the reranker reorders the embedder's top `candidates`.
A passage whose text equals the source passage (a duplicate in the corpus) counts as the source.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from bidir_core.errors import BidirError
from bidir_core.search import exact_search
from bidir_train.mine import check_finite_embeddings
from bidir_train.query_generator import normalize

_QUERY_BLOCK = 4096  # queries searched at once (one progress step)


def round_trip_filter(
    encoder,
    queries: Sequence[str],
    sources: Sequence[int],
    corpus: Sequence[str],
    *,
    top_k: int,
    reranker=None,
    candidates: int = 20,
    batch_size: int = 32,
    progress: bool = False,
    device: str = "cpu",
) -> tuple[list[bool], dict]:
    """(keep per query, counts {"pairs", "kept_embedder", "kept"}): queries[i] was generated from
    corpus[sources[i]].

    encoder: anything with encode_queries / encode_documents(texts, batch_size=, normalize=, show_progress_bar=)
    (a BiEncoder). reranker: anything with predict(pairs, batch_size=, show_progress_bar=) -> scores (a
    CrossEncoder), or None. candidates: how many of the embedder's best the reranker reorders (at least top_k)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise BidirError(f"filter top_k must be a positive integer, got {top_k!r}")
    if reranker is not None and candidates < top_k:
        raise BidirError(f"filter candidates ({candidates}) must be at least filter top_k ({top_k})")
    if not queries:
        return [], {"pairs": 0, "kept_embedder": 0, "kept": 0}
    kw = dict(batch_size=batch_size, normalize=True, show_progress_bar=progress)  # normalized: dot = cosine
    docs = encoder.encode_documents(list(corpus), **kw)  # (N, D)
    check_finite_embeddings(docs, "passage", corpus)
    embedded = encoder.encode_queries(list(queries), **kw)  # (Q, D)
    check_finite_embeddings(embedded, "query", queries)
    docs = torch.from_numpy(docs).to(device)
    embedded = torch.from_numpy(embedded).to(device)
    k = max(top_k, candidates) if reranker is not None else top_k
    indices: list[list[int]] = []  # per query: corpus indices, best first
    for start in tqdm(
        range(0, len(queries), _QUERY_BLOCK), disable=not progress, desc="filter", unit="block"
    ):
        indices += exact_search(embedded[start : start + _QUERY_BLOCK], docs, k)[1].tolist()

    norm = [normalize(text) for text in corpus]

    def is_source(q: int, c: int) -> bool:
        return c == sources[q] or norm[c] == norm[sources[q]]

    keep = [any(is_source(q, c) for c in indices[q][:top_k]) for q in range(len(queries))]
    kept_embedder = sum(keep)
    if reranker is not None:
        survivors = [q for q in range(len(queries)) if keep[q]]
        pairs = [(queries[q], corpus[c]) for q in survivors for c in indices[q][:candidates]]
        scores = reranker.predict(pairs, batch_size=batch_size, show_progress_bar=progress).tolist()
        start = 0
        for q in survivors:
            shortlist = indices[q][:candidates]
            own = scores[start : start + len(shortlist)]
            start += len(shortlist)
            best = max(s for s, c in zip(own, shortlist, strict=True) if is_source(q, c))
            # Its rank among the reranked candidates: the other passages scored above it (ties in its favour).
            above = sum(s > best for s, c in zip(own, shortlist, strict=True) if not is_source(q, c))
            keep[q] = above < top_k
    return keep, {"pairs": len(queries), "kept_embedder": kept_embedder, "kept": sum(keep)}
