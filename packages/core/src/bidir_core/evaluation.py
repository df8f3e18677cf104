"""Evaluating an encoder: retrieval on a RetrievalDataset (exact search + trec_eval-style metrics) and STS
correlation. Works on any encoder with BiEncoder's encode_queries / encode_documents (e.g. during training).

Embeddings are L2-normalized, so every score is a cosine similarity. Queries get the model's query prefix and
documents its passage prefix; both sentences of an STS pair get the query prefix (a symmetric task, as E5 does).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import numpy as np
import torch

from bidir_core.artifacts import checkpoint_fingerprint
from bidir_core.datasets import (
    RetrievalDataset,
    StsPair,
    builtin_counts,
    load_retrieval,
    read_sts,
)
from bidir_core.embeddings_artifact import Embeddings, read_embeddings
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.metrics import RETRIEVAL_METRICS, pearson, retrieval_metrics, spearman
from bidir_core.search import RunningTopK, exact_search
from bidir_core.sources import ModelSource, open_source

__all__ = [
    "RETRIEVAL_METRICS",
    "evaluate_model",
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
    corpus_embeddings: Embeddings | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """RETRIEVAL_METRICS of the encoder on the dataset's judged queries.

    The corpus is embedded corpus_chunk documents at a time and each chunk is searched right away (a running
    top-100 per query), so memory holds the query embeddings and one chunk, never the whole corpus's embeddings.
    With corpus_embeddings (an embeddings folder written by batch-embed, read with read_embeddings) the corpus is
    not embedded again: its shards are searched one at a time instead, and only the queries go through encoder.
    """
    if isinstance(corpus_chunk, bool) or not isinstance(corpus_chunk, int) or corpus_chunk < 1:
        raise BidirError(f"corpus_chunk must be a positive integer, got {corpus_chunk!r}")
    missing = [q for q in dataset.qrels if q not in dataset.queries]
    if missing:
        raise BidirError(f"{dataset.name}: {len(missing)} judged queries have no text, e.g. {missing[0]!r}")
    query_ids = list(dataset.qrels)
    doc_ids = list(dataset.corpus)
    options = {"batch_size": batch_size, "dim": dim, "normalize": True, **_progress(progress)}
    with evaluating(encoder):
        queries = _finite(encoder.encode_queries([dataset.queries[q] for q in query_ids], **options), dataset)
        top = RunningTopK(torch.from_numpy(queries), TOP_K)
        if corpus_embeddings is not None:
            doc_ids = _search_written(top, corpus_embeddings, dataset, queries.shape[1])
        else:
            for start in range(0, len(doc_ids), corpus_chunk):
                texts = [dataset.corpus[d] for d in doc_ids[start : start + corpus_chunk]]
                top.add(torch.from_numpy(_finite(encoder.encode_documents(texts, **options), dataset)))
    scores, indices = top.result()  # (Q, min(100, N)), best first
    run = {
        query_id: {doc_ids[i]: s for i, s in zip(row_indices.tolist(), row_scores.tolist(), strict=True)}
        for query_id, row_scores, row_indices in zip(query_ids, scores, indices, strict=True)
    }
    return retrieval_metrics(run, dataset.qrels)


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


def evaluate_sts(
    encoder, pairs: list[StsPair], *, batch_size: int = 32, dim: int | None = None, progress: bool = False
) -> dict[str, float]:
    """Spearman and Pearson correlation between the gold scores and the cosine similarity of each pair."""
    if len(pairs) < 2:
        raise BidirError(f"STS evaluation needs at least 2 pairs, got {len(pairs)}")
    sentences = list(dict.fromkeys(s for pair in pairs for s in (pair.sentence1, pair.sentence2)))
    row = {s: i for i, s in enumerate(sentences)}  # each distinct sentence is embedded once
    with evaluating(encoder):
        emb = encoder.encode_queries(
            sentences, batch_size=batch_size, dim=dim, normalize=True, **_progress(progress)
        )
        emb = _finite(emb, "STS")
    first = emb[[row[p.sentence1] for p in pairs]].astype(np.float64)  # (P, D)
    second = emb[[row[p.sentence2] for p in pairs]].astype(np.float64)
    cosine = (first * second).sum(axis=1)
    gold = [p.score for p in pairs]
    if len(set(gold)) == 1:
        raise BidirError(
            f"all {len(gold)} gold scores are equal ({gold[0]}): a correlation with them is undefined"
        )
    # Equal cosines for every pair (a collapsed model) leave the correlation undefined too: None (JSON null), not
    # nan, which is not JSON.
    metrics = {"spearman": spearman(cosine, gold), "pearson": pearson(cosine, gold)}
    return {name: None if math.isnan(value) else value for name, value in metrics.items()}


def _progress(show: bool) -> dict:
    # Only asked for when wanted: an encoder other than BiEncoder need not know show_progress_bar.
    return {"show_progress_bar": True} if show else {}


def _finite(embeddings: np.ndarray, what) -> np.ndarray:
    if not np.isfinite(embeddings).all():
        name = what.name if isinstance(what, RetrievalDataset) else what
        raise BidirError(f"{name}: the model produced non-finite (nan/inf) embeddings")
    return embeddings


def check_embeddings_match(
    written: Embeddings, source: ModelSource, passage_prefix: str, allow: bool
) -> None:
    """Corpus embeddings must come from the model evaluated (its checkpoint fingerprint: the manifest's own, or for
    embeddings made from an export, the export's source) and its passage prompt: another model's vectors, or
    query-prompt ones, score plausible but meaningless metrics. A mismatch is an error, or with allow a warning."""
    m = written.manifest
    problems = []
    model = source.name
    fingerprint = checkpoint_fingerprint(source.path)
    if fingerprint not in (m.model_fingerprint, m.settings.get("source_fingerprint")):
        problems.append(f"they were made by another model ({m.model}), not {model}")
    if m.prompt != "passage" or m.prefix != passage_prefix:
        problems.append(
            f"they were made with prompt {m.prompt!r} (prefix {m.prefix!r}), not the passage prefix "
            f"{passage_prefix!r} (batch-embed --prompt passage)"
        )
    if not problems:
        return
    message = f"{written.folder}: {'; '.join(problems)}"
    if not allow:
        raise BidirError(f"{message}; pass --allow-mismatched-embeddings to score them anyway")
    warnings.warn(
        f"MISMATCHED CORPUS EMBEDDINGS, the metrics do not measure {model}: {message}", stacklevel=2
    )


def evaluate_model(
    model: str,
    *,
    retrieval: str | None = None,
    split: str = "test",
    sts: str | None = None,
    batch_size: int = 32,
    dim: int | None = None,
    corpus_embeddings: str | None = None,
    allow_mismatched_embeddings: bool = False,
    progress: bool = False,
) -> dict:
    """Load a model (anything BiEncoder.from_pretrained accepts) and evaluate it on one task: a retrieval dataset
    (a BEIR folder or "stdlib-docstrings") or an STS TSV file. Returns the report bidir-eval prints and writes:
    {"task", "model", "dataset", "dim", "metrics", "counts", "timing"}; metrics are fractions. corpus_embeddings:
    an embeddings folder (batch-embed's output) holding the retrieval corpus, searched instead of embedding it; it
    must have been made by this model with its passage prompt (check_embeddings_match), unless
    allow_mismatched_embeddings, which only warns."""
    if (retrieval is None) == (sts is None):
        raise BidirError("give exactly one task: a retrieval dataset or an STS file")
    if corpus_embeddings is not None and retrieval is None:
        raise BidirError("corpus embeddings are for a retrieval task")
    start = time.perf_counter()
    # Data first: a bad file is reported before the (slow) model load.
    if retrieval is not None:
        data = load_retrieval(retrieval, split)
        counts = {
            "queries": len(data.qrels),
            "documents": len(data.corpus),
            "judgments": sum(map(len, data.qrels.values())),
        }
        if (mined := builtin_counts(retrieval)) is not None:
            counts["mined"] = mined
        written = read_embeddings(corpus_embeddings) if corpus_embeddings is not None else None
    else:
        pairs, written = read_sts(sts), None
        counts = {"pairs": len(pairs)}
        if len(pairs) >= 2 and len({p.score for p in pairs}) == 1:  # before the model load, naming the file
            raise BidirError(
                f"{sts}: all {len(pairs)} gold scores are equal ({pairs[0].score}): a correlation with them is "
                "undefined"
            )
    loaded_data = time.perf_counter()
    source = open_source(model)
    encoder = BiEncoder.from_pretrained(source)
    if written is not None:
        check_embeddings_match(written, source, encoder.config.passage_prefix, allow_mismatched_embeddings)
    loaded_model = time.perf_counter()
    if retrieval is not None:
        metrics = evaluate_retrieval(
            encoder, data, batch_size=batch_size, dim=dim, corpus_embeddings=written, progress=progress
        )
    else:
        metrics = evaluate_sts(encoder, pairs, batch_size=batch_size, dim=dim, progress=progress)
    done = time.perf_counter()
    return {
        "task": "retrieval" if retrieval is not None else "sts",
        "model": str(model),
        "dataset": data.name if retrieval is not None else str(sts),
        "dim": dim or encoder.hidden_size,
        "metrics": metrics,
        "counts": counts,
        "timing": {
            "data_s": round(loaded_data - start, 3),
            "model_s": round(loaded_model - loaded_data, 3),
            "eval_s": round(done - loaded_model, 3),
            "total_s": round(done - start, 3),
        },
    }
