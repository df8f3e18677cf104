"""Reranking speed: CrossEncoder.predict, packed and padded, vs sentence-transformers' CrossEncoder.predict on the
same checkpoint and the same (query, passage) pairs.

The pairs are a reranker's real work: the first --queries Cranfield test queries, each with its BM25 top --top-k
documents (bidir_core.bm25), in that order. The model is --model (a reranker checkpoint, or a decoder such as the
embedded default given a fresh seeded head), with "last" pooling and causal attention, as transformers'
*ForSequenceClassification reads it, saved with save_pretrained and loaded back by both libraries. Every path is
timed from pairs to raw float32 logits, tokenizing included, at the same dtype and batch size:

- sentence-transformers: sentence_transformers.CrossEncoder(folder, max_length).predict(pairs, activation_fn=Identity):
                         its own length sorting, each batch padded to its longest pair; the checkpoint's chat template
                         renders a pair as our template does, so it reads the same tokens.
- bidir padded:          CrossEncoder.predict(packed=False): length-sorted batches of batch_size pairs, each padded.
- bidir packed:          CrossEncoder.predict(packed=True): length-sorted packed batches of at most --max-tokens real
                         tokens and batch_size pairs.

Each path first scores the first batch (the warm-up), checked against bidir padded; then each is timed --repeats
times, interleaved. The table gives medians, pairs/s, real tokens/s (ours: padding not counted) and the ratios.

    python benchmarks/bench_rerank.py [--model smollm2-135m] [--queries 8] [--top-k 8] [--batch-size 16]
                                      [--dtype fp32|bf16] [--max-tokens 4096] [--repeats 2] [--threads N]
                                      [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from harness import append_jsonl, check, cpu_name, data_file, environment, interleaved, medians, warn_if_busy

from bidir_core.bm25 import bm25_run
from bidir_core.cross_encoder import CrossEncoder
from bidir_core.datasets import load_retrieval
from bidir_core.devices import default_device
from bidir_core.encoder import PACKED_TOKENS
from bidir_core.errors import BidirError
from bidir_core.metrics import ranked
from bidir_core.sources import open_source

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE = "bidir padded"


def load_pairs(queries: int, top_k: int) -> list[tuple[str, str]]:
    """Each of the first `queries` Cranfield test queries with its BM25 top_k documents."""
    data = load_retrieval(data_file("bench_rerank", "cranfield"), "test")
    run = bm25_run(data, top_k)
    return [(data.queries[q], data.corpus[d]) for q in list(run)[:queries] for d in ranked(run[q])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", default="smollm2-135m", help="a reranker checkpoint, or a decoder (a fresh head)"
    )
    ap.add_argument("--queries", type=int, default=8, help="Cranfield test queries")
    ap.add_argument("--top-k", type=int, default=8, help="BM25 documents per query: the pairs to score")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument(
        "--max-tokens", type=int, default=PACKED_TOKENS, help="bidir packed: real tokens per batch"
    )
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per path; the median is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line with all figures")
    args = ap.parse_args()
    if min(args.queries, args.top_k, args.batch_size, args.max_tokens, args.repeats) < 1:
        sys.exit(
            "bench_rerank: --queries, --top-k, --batch-size, --max-tokens and --repeats must be at least 1"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    from sentence_transformers import CrossEncoder as StCrossEncoder

    pairs = load_pairs(args.queries, args.top_k)
    device = default_device()
    cuda = torch.cuda.get_device_name(0) if device == "cuda" else None
    print(f"measuring on CUDA: {cuda}" if cuda else f"no CUDA: measuring on CPU: {cpu_name()}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads"
    )
    busy = warn_if_busy()

    dtype, bs = DTYPES[args.dtype], args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        try:
            new_head = open_source(args.model).kind != "reranker"
            start = CrossEncoder.from_pretrained(
                args.model, pooling="last", attention="causal", new_head=new_head, seed=0
            )
        except BidirError as e:
            sys.exit(f"bench_rerank: {e}")
        folder = start.save_pretrained(Path(tmp) / "reranker")
        reranker = CrossEncoder.from_pretrained(folder, dtype=dtype, device=device).eval()
        max_length = reranker.config.max_length  # both cut a long pair's passage at the same token
        st = StCrossEncoder(str(folder), device=device, max_length=max_length, model_kwargs={"dtype": dtype})

    ids, _ = reranker.tokenize_pairs(pairs)
    lengths = [len(row) for row in ids]
    st_batch = st.preprocess(pairs)
    st_lengths = st_batch["attention_mask"].sum(dim=1).tolist()  # its real tokens
    shapes = {
        "pairs": len(pairs),
        "queries": args.queries,
        "top_k": args.top_k,
        "batch_size": bs,
        "real_tokens": sum(lengths),
        "real_tokens_sentence_transformers": sum(st_lengths),
        "max_tokens_per_pair": max(lengths),
        "packed_max_tokens": args.max_tokens,
        "dtype": args.dtype,
    }
    print(f"{args.model}: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))

    identity = torch.nn.Identity()
    runs = {
        BASELINE: lambda p: reranker.predict(p, batch_size=bs, packed=False),
        "bidir packed": lambda p: reranker.predict(p, batch_size=bs, packed=True, max_tokens=args.max_tokens),
        "sentence-transformers": lambda p: np.asarray(
            st.predict(p, batch_size=bs, activation_fn=identity), np.float32
        ),
    }
    with torch.inference_mode():
        first = {path: run(pairs[:bs]) for path, run in runs.items()}  # warm-up, and the correctness check
        check_first = {}
        for path in list(runs)[1:]:
            diff = float(np.abs(first[path] - first[BASELINE]).max())
            check_first[path] = {"max_abs_diff": diff}
            check(
                f"{path} vs {BASELINE}",
                f"max |logit diff| {diff:.2e}",
                diff <= (1e-3 if dtype == torch.float32 else 0.1),
                f"bench_rerank: {path} disagrees with {BASELINE}",
            )
        times = interleaved(runs, [(pairs,)] * args.repeats, device=device)
    med = medians(times)
    tokens = {path: sum(st_lengths if path == "sentence-transformers" else lengths) for path in med}
    results = {
        "seconds": times,
        "median_s": med,
        "pairs_per_s": {path: len(pairs) / s for path, s in med.items()},
        "tokens_per_s": {path: tokens[path] / s for path, s in med.items()},
        "ratios": {
            "packed_vs_padded": med["bidir padded"] / med["bidir packed"],
            "packed_vs_sentence_transformers": med["sentence-transformers"] / med["bidir packed"],
            "padded_vs_sentence_transformers": med["sentence-transformers"] / med["bidir padded"],
        },
        "check_first_batch": check_first,
    }
    print(f"\n{'path':<24} {'median s':>9} {'pairs/s':>9} {'tokens/s':>10}")
    for path, s in med.items():
        print(
            f"{path:<24} {s:>9.2f} {results['pairs_per_s'][path]:>9.1f} {results['tokens_per_s'][path]:>10.1f}"
        )
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in results["ratios"].items()))
    if args.json:
        record = {
            "benchmark": "bench_rerank",
            **environment(busy_cores_start=busy),
            "model": str(args.model),
            "shapes": {**shapes, "repeats": args.repeats},
            "results": results,
        }
        append_jsonl(args.json, record)


if __name__ == "__main__":
    main()
