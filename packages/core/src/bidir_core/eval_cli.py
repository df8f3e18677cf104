"""bidir-eval: retrieval (nDCG@10, recall@k, MRR@10, MAP@100) or STS (Spearman, Pearson) scores of a model, or of
BM25; a reranker can reorder the retrieval run, and is scored beside it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bidir_core.cli import run_cli
from bidir_core.devices import PRECISIONS
from bidir_core.errors import BidirError
from bidir_core.fusion import FUSIONS
from bidir_core.jsonfile import write_json_atomic
from bidir_core.outputs import check_writable
from bidir_core.runs import RERANK_TOP_K

EXAMPLES = """examples:
  bidir-eval smollm2-135m --retrieval stdlib-docstrings
  bidir-eval ./my-embedder --retrieval ../shared/data/cranfield --split test --json runs/cranfield.json
  bidir-eval ./my-embedder --sts ../shared/data/stsb/sts-dev.tsv --dim 256
  bidir-eval ./my-embedder --retrieval ./beir-folder --corpus-embeddings ./corpus-emb   (from batch-embed)
  bidir-eval bm25 --retrieval ../shared/data/cranfield
  bidir-eval bm25 --retrieval ../shared/data/cranfield --rerank ./my-reranker --rerank-top-k 50
  bidir-eval ./my-embedder --retrieval stdlib-docstrings --rerank ./my-reranker
  bidir-eval bm25 --retrieval stdlib-docstrings --rerank ./my-reranker --rerank-fusion weighted   (+ BM25's scores)
  bidir-eval ./my-embedder --retrieval ../shared/data/cranfield --hybrid weighted   (dense + BM25, fused)
  bidir-eval ./my-embedder --retrieval ./beir-folder --rerank ./my-reranker --device cuda --precision bf16"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bidir-eval",
        description="Evaluate an embedding model (or BM25) on a retrieval dataset (a BEIR folder: corpus.jsonl, "
        "queries.jsonl, qrels/<split>.tsv; or the embedded 'stdlib-docstrings') or on an STS TSV file "
        "(score<TAB>sentence1<TAB>sentence2). Scores are cosine similarities; metrics are fractions. With --rerank, a "
        "reranker rescores each query's top documents and its metrics are printed beside the first stage's.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        metavar="FIRST_STAGE",
        help="an embedder: a bidir checkpoint, a Hugging Face Llama folder, a .gguf file or 'smollm2-135m'; or the "
        "word 'bm25' (retrieval only; a folder named bm25 is ./bm25)",
    )
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--retrieval", metavar="BEIR_DIR_OR_NAME", help="a BEIR folder or 'stdlib-docstrings'")
    task.add_argument("--sts", metavar="TSV", help="an STS file: score, sentence1, sentence2[, more columns]")
    p.add_argument("--split", default="test", help="qrels split for --retrieval (default: test)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    p.add_argument("--dim", type=int, help="Matryoshka: evaluate the first DIM dimensions (default: all)")
    p.add_argument(
        "--corpus-embeddings",
        metavar="DIR",
        help="with --retrieval: the corpus's embeddings as batch-embed wrote them (only the queries are embedded)",
    )
    p.add_argument(
        "--allow-mismatched-embeddings",
        action="store_true",
        help="score --corpus-embeddings made by another model or prompt anyway (with a warning)",
    )
    p.add_argument(
        "--rerank",
        metavar="RERANKER",
        help="with --retrieval: a reranker checkpoint that rescores each query's top documents of the first stage",
    )
    p.add_argument(
        "--rerank-top-k",
        type=int,
        metavar="K",
        help=f"documents per query the reranker scores (default: {RERANK_TOP_K}); the ones below are dropped",
    )
    p.add_argument(
        "--rerank-fusion",
        choices=FUSIONS,
        help="with --rerank: also fuse the reranker's scores with the first stage's over the same documents "
        "(weighted: min-max scaled, equal weights; rrf: reciprocal-rank fusion), printed beside the reranked run",
    )
    p.add_argument(
        "--hybrid",
        choices=FUSIONS,
        help="with --retrieval and an embedder: also run BM25 and fuse the two runs (weighted: min-max scaled scores "
        "summed with equal weights; rrf: reciprocal-rank fusion); printed beside each alone, and what --rerank "
        "reorders",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), help="where the models run (default: cuda when available)"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="the models' weights: fp32 (default), bf16, or auto (bf16 where the device computes it in hardware)",
    )
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("bidir-eval", lambda: evaluate(args))


def evaluate(args: argparse.Namespace) -> None:
    """Evaluate, write the JSON report if asked (never half-written), print the report."""
    from bidir_core.evaluation import evaluate_model  # after parsing, so --help answers at once

    if args.batch_size < 1:
        raise BidirError(f"--batch-size must be positive, got {args.batch_size}")
    if args.rerank is not None and args.sts is not None:
        raise BidirError("--rerank reorders a retrieval run: use it with --retrieval, not --sts")
    if args.rerank_top_k is not None and args.rerank is None:
        raise BidirError("--rerank-top-k is for a reranker: give --rerank RERANKER too")
    if args.rerank_top_k is not None and args.rerank_top_k < 1:
        raise BidirError(f"--rerank-top-k must be positive, got {args.rerank_top_k}")
    if args.rerank_fusion is not None and args.rerank is None:
        raise BidirError(
            "--rerank-fusion fuses a reranker's scores with the first stage's: give --rerank RERANKER"
        )
    json_path = Path(args.json).expanduser() if args.json else None  # the file checked is the file written
    if json_path is not None:
        check_writable(json_path)  # before the evaluation, not after it
    report = evaluate_model(
        args.model,
        retrieval=args.retrieval,
        split=args.split,
        sts=args.sts,
        batch_size=args.batch_size,
        dim=args.dim,
        corpus_embeddings=args.corpus_embeddings,
        allow_mismatched_embeddings=args.allow_mismatched_embeddings,
        rerank=args.rerank,
        rerank_top_k=RERANK_TOP_K if args.rerank_top_k is None else args.rerank_top_k,
        rerank_fusion=args.rerank_fusion,
        hybrid=args.hybrid,
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
    )
    if json_path is not None:
        try:  # nan / inf are not JSON (json.dumps would write a bare NaN)
            json.dumps(report, allow_nan=False)
        except ValueError:
            raise BidirError(f"{args.json}: the report holds a non-finite number; not written") from None
        write_json_atomic(json_path, report)  # OUT is never half-written
    print(format_report(report))


def format_report(report: dict) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in report["counts"].items() if isinstance(v, int))
    dim = "" if report["dim"] is None else f", dim {report['dim']}"
    lines = [f"{report['model']} on {report['dataset']} ({report['task']}: {counts}{dim})"]
    timing = report["timing"]
    reranked, hybrid = report.get("reranked"), report.get("hybrid")
    # One column per run: the first stage, then BM25 and the fused run (hybrid), then the reranked run (and it fused
    # with the first stage).
    columns = [("first" if hybrid is None else "dense", report["metrics"])]
    if hybrid is not None:
        lines.append(f"  hybrid: the dense run and BM25's fused by {hybrid['fusion']}")
        columns += [("bm25", hybrid["bm25"]), ("hybrid", hybrid["metrics"])]
    if reranked is not None:
        lines.append(
            f"  reranked by {reranked['model']}: each query's top {reranked['top_k']} "
            f"({reranked['counts']['pairs']} pairs)"
        )
        columns.append(("reranked", reranked["metrics"]))
        if (fused := reranked.get("fused")) is not None:
            lines.append(
                f"  fused: the reranked run and the first stage's scores of its documents, by {fused['fusion']}"
            )
            columns.append(("fused", fused["metrics"]))
    if len(columns) == 1:
        lines += [f"  {name:<11} {_value(value)}" for name, value in report["metrics"].items()]
    else:
        lines.append(f"  {'':<11} " + " ".join(f"{title:>9}" for title, _ in columns))
        lines += [
            f"  {name:<11} " + " ".join(f"{_value(metrics[name]):>9}" for _, metrics in columns)
            for name in report["metrics"]
        ]
    lines.append(f"  model loaded in {timing['model_s']:.1f} s, evaluated in {timing['eval_s']:.1f} s")
    if reranked is not None:
        lines.append(
            f"  reranker loaded in {reranked['timing']['model_s']:.1f} s, "
            f"reranked in {reranked['timing']['eval_s']:.1f} s"
        )
    return "\n".join(lines)


def _value(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
