"""Evaluating a model: retrieval on a RetrievalDataset (the run of a first stage, optionally reranked, scored with
trec_eval-style metrics) and STS correlation. evaluate_retrieval works on any encoder with BiEncoder's
encode_queries / encode_documents (e.g. during training).

Embeddings are L2-normalized, so every score is a cosine similarity. Queries get the model's query prefix and
documents its passage prefix; both sentences of an STS pair get the query prefix (a symmetric task, as E5 does).
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np

from bidir_core.artifacts import checkpoint_fingerprint
from bidir_core.bm25 import bm25_run
from bidir_core.cross_encoder import CrossEncoder
from bidir_core.datasets import (
    RetrievalDataset,
    StsPair,
    builtin_counts,
    load_retrieval,
    read_sts,
)
from bidir_core.devices import default_device, precision_dtype, resolve_precision
from bidir_core.embeddings_artifact import Embeddings, read_embeddings
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.fusion import check_fusion, fuse, fuse_reranked
from bidir_core.metrics import RETRIEVAL_METRICS, TOP_K, pearson, retrieval_metrics, spearman
from bidir_core.runs import RERANK_TOP_K, embedder_run, evaluating, finite, progress_option, rerank_run
from bidir_core.search import exact_search
from bidir_core.sources import ModelSource, open_source

__all__ = [
    "RETRIEVAL_METRICS",
    "TOP_K",
    "evaluate_model",
    "evaluate_retrieval",
    "evaluate_sts",
    "exact_search",
    "retrieval_metrics",
]

BM25 = "bm25"
"""The first stage that is not a model (bidir-eval bm25 --retrieval DATA): bm25.py's BM25 over the corpus's words."""


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
    """RETRIEVAL_METRICS of the encoder on the dataset's judged queries: the metrics of its run (embedder_run, which
    says how the corpus is searched in bounded memory, or read from corpus_embeddings)."""
    run = embedder_run(
        encoder,
        dataset,
        batch_size=batch_size,
        dim=dim,
        corpus_chunk=corpus_chunk,
        corpus_embeddings=corpus_embeddings,
        progress=progress,
    )
    return retrieval_metrics(run, dataset.qrels)


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
            sentences, batch_size=batch_size, dim=dim, normalize=True, **progress_option(progress)
        )
        emb = finite(emb, "STS")
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
    rerank: str | None = None,
    rerank_top_k: int = RERANK_TOP_K,
    rerank_fusion: str | None = None,
    hybrid: str | None = None,
    device: str | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> dict:
    """Evaluate a first stage on one task: an embedder (anything BiEncoder.from_pretrained accepts) or "bm25", on a
    retrieval dataset (a BEIR folder or "stdlib-docstrings") or, for an embedder, an STS TSV file. Returns the
    report bidir-eval prints and writes: {"task", "model", "dataset", "dim", "metrics", "counts", "timing"};
    metrics are fractions. corpus_embeddings: an embeddings folder (batch-embed's output) holding the retrieval
    corpus, searched instead of embedding it; it must have been made by this model with its passage prompt
    (check_embeddings_match), unless allow_mismatched_embeddings, which only warns.

    rerank: a reranker checkpoint that reorders each query's top rerank_top_k documents of the first stage's run;
    the report then also holds "reranked": {"model", "top_k", "metrics", "counts", "timing"}, and "metrics" stays
    the first stage's. rerank_fusion: a fusion rule (fusion.FUSIONS) that also fuses the reranker's scores with the
    first stage's over the same documents (fusion.fuse_reranked); "reranked" then holds "fused": {"fusion",
    "metrics"}.

    hybrid: a fusion rule (fusion.FUSIONS) that fuses an embedder's run with BM25's; the report then also holds
    "hybrid": {"fusion", "bm25": BM25's metrics, "metrics": the fused run's, "timing"}, and a reranker reorders the
    fused run.

    device: where the embedder and the reranker run (default: cuda when available); precision: the dtype their
    weights are loaded in, fp32 (the default: the metrics of record), bf16, or auto (bf16 where the device computes it
    in hardware, bidir_core.devices). The report holds both ("device", "precision")."""
    device = device or default_device()
    dtype = precision_dtype(precision, device)  # a bad precision is refused before any data is read
    if (retrieval is None) == (sts is None):
        raise BidirError("give exactly one task: a retrieval dataset or an STS file")
    if corpus_embeddings is not None and retrieval is None:
        raise BidirError("corpus embeddings are for a retrieval task")
    if rerank is not None and retrieval is None:
        raise BidirError("a reranker reorders a retrieval run: give a retrieval dataset, not an STS file")
    if isinstance(rerank_top_k, bool) or not isinstance(rerank_top_k, int) or rerank_top_k < 1:
        raise BidirError(f"the rerank top k must be a positive integer, got {rerank_top_k!r}")
    if rerank_fusion is not None:
        check_fusion(rerank_fusion, "rerank fusion")
    if rerank_fusion is not None and rerank is None:
        raise BidirError(
            "rerank fusion fuses a reranker's scores with the first stage's: give a reranker too"
        )
    if hybrid is not None:
        check_fusion(hybrid, "hybrid fusion")
    if hybrid is not None and retrieval is None:
        raise BidirError("hybrid fuses retrieval runs: give a retrieval dataset, not an STS file")
    bm25 = model == BM25
    if bm25 and hybrid is not None:
        raise BidirError(
            "hybrid fuses an embedder's run with BM25's: give an embedder as the first stage, not bm25"
        )
    if bm25 and retrieval is None:
        raise BidirError("bm25 is a retrieval first stage: give a retrieval dataset, not an STS file")
    if bm25 and (dim is not None or corpus_embeddings is not None):
        raise BidirError("bm25 ranks by words: a dim or corpus embeddings are for an embedder")
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
    # Both sources are opened (cheap) before either model is loaded, so a model in the wrong place is refused early.
    source = None if bm25 else open_source(model)
    if source is not None and source.kind == "reranker":
        raise BidirError(f"{model} is a reranker: pass it as --rerank")
    rerank_source = open_source(rerank) if rerank is not None else None
    if rerank_source is not None and rerank_source.kind != "reranker":
        raise BidirError(f"{rerank} is an {rerank_source.kind}, not a reranker: --rerank takes a reranker")
    encoder = None if bm25 else BiEncoder.from_pretrained(source, device=device, dtype=dtype)
    if written is not None:
        check_embeddings_match(written, source, encoder.config.passage_prefix, allow_mismatched_embeddings)
    loaded_model = time.perf_counter()
    # The reranker too is loaded before any evaluation: a reranker that fails to load wastes no first stage.
    cross_encoder = (
        CrossEncoder.from_pretrained(rerank_source, device=device, dtype=dtype)
        if rerank_source is not None
        else None
    )
    loaded_reranker = time.perf_counter()
    if retrieval is not None:
        top_k = max(TOP_K, rerank_top_k) if rerank is not None else TOP_K
        if bm25:
            run = bm25_run(data, top_k)
        else:
            run = embedder_run(
                encoder,
                data,
                top_k=top_k,
                batch_size=batch_size,
                dim=dim,
                corpus_embeddings=written,
                progress=progress,
            )
        metrics = retrieval_metrics(run, data.qrels)
    else:
        metrics = evaluate_sts(encoder, pairs, batch_size=batch_size, dim=dim, progress=progress)
    done = time.perf_counter()
    ran_model = encoder is not None or cross_encoder is not None  # BM25 alone runs none
    report = {
        "task": "retrieval" if retrieval is not None else "sts",
        "model": str(model),
        "dataset": data.name if retrieval is not None else str(sts),
        "dim": None if bm25 else dim or encoder.hidden_size,
        "device": str(device) if ran_model else None,  # where a model ran, and in which dtype
        "precision": resolve_precision(precision, device) if ran_model else None,
        "metrics": metrics,
        "counts": counts,
        "timing": {
            "data_s": round(loaded_data - start, 3),
            "model_s": round(loaded_model - loaded_data, 3),
            "eval_s": round(done - loaded_reranker, 3),
            "total_s": round(done - start, 3),
        },
    }
    if hybrid is not None:
        lexical = bm25_run(data, top_k)
        run = fuse([run, lexical], hybrid, top_k=top_k)  # what a reranker then reorders
        fused_at = time.perf_counter()
        report["hybrid"] = {
            "fusion": hybrid,
            "bm25": retrieval_metrics(lexical, data.qrels),
            "metrics": retrieval_metrics(run, data.qrels),
            "timing": {"eval_s": round(fused_at - done, 3)},
        }
        report["timing"]["total_s"] = round(fused_at - start, 3)
        done = fused_at
    if cross_encoder is not None:
        reranked = rerank_run(
            cross_encoder, data, run, rerank_top_k, batch_size=batch_size, progress=progress
        )
        reranked_at = time.perf_counter()
        report["reranked"] = {
            "model": str(rerank),
            "top_k": rerank_top_k,
            "metrics": retrieval_metrics(reranked, data.qrels),
            "counts": {"pairs": sum(map(len, reranked.values()))},
            "timing": {
                "model_s": round(loaded_reranker - loaded_model, 3),
                "eval_s": round(reranked_at - done, 3),
            },
        }
        if rerank_fusion is not None:
            fused = fuse_reranked(reranked, run, rerank_fusion)
            report["reranked"]["fused"] = {
                "fusion": rerank_fusion,
                "metrics": retrieval_metrics(fused, data.qrels),
            }
        report["timing"]["total_s"] = round(reranked_at - start, 3)
    return report
