"""Encoding speed: bidir's BiEncoder.encode vs the plain transformers loop (same weights, dtype, batch size).

Three paths, each timed from texts to L2-normalized, mean-pooled float32 embeddings, tokenizing included:

- transformers loop: AutoModel (a LlamaModel, is_causal false) + AutoTokenizer on the embedded default
  checkpoint; tokenizer(batch, padding=True, truncation=True, max_length=the checkpoint's) on input-order batches, masked
  mean, normalize.
- bidir unsorted:    bidir's model (BiEncoder.forward) on the same input-order batches: the model alone.
- bidir encode:      BiEncoder.encode, which batches by token length: adds length-sorted batching.

Texts: both sentence columns of STS-B dev (../shared/data/stsb/sts-dev.tsv, 3000 sentences, row by row). Each
path first runs on the first batch (the warm-up), whose embeddings are checked against the baseline; then each
path is timed --repeats times, interleaved. The table gives medians and throughput ratios (> 1: bidir faster).
Runs on CUDA when available, else on CPU, and says which.

    nox -s bench -- --json runs/bench.jsonl
    python benchmarks/bench_encode.py [--batch-size 32] [--dtypes fp32,bf16] [--repeats 3] [--limit N]
                                      [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from harness import (
    agreement,
    append_jsonl,
    check,
    cpu_name,
    data_file,
    environment,
    interleaved,
    medians,
    warn_if_busy,
)
from transformers import AutoModel, AutoTokenizer

from bidir_core.batching import length_sorted_batches, pad_batch
from bidir_core.checkpoint import EncoderConfig, read_encoder_config
from bidir_core.encoder import BiEncoder
from bidir_core.errors import BidirError
from bidir_core.sources import resolve_source
from bidir_core.tokenization import tokenize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = ("transformers loop", "bidir unsorted", "bidir encode")


def load_sentences(limit: int | None) -> list[str]:
    tsv = data_file("bench_encode", "stsb", "sts-dev.tsv")
    rows = [line.rstrip("\n").split("\t") for line in tsv.read_text(encoding="utf-8").splitlines()[1:]]
    return [s for row in rows for s in (row[1], row[2])][:limit]


def transformers_loop(
    model, tokenizer, texts: list[str], batch_size: int, max_length: int, device: str
) -> torch.Tensor:
    """What a transformers user writes: tokenize each input-order batch, run, masked mean, normalize."""
    out = []
    for i in range(0, len(texts), batch_size):
        batch = texts[i : i + batch_size]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc = enc.to(device)
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(F.normalize(emb, p=2, dim=-1).cpu())
    return torch.cat(out)


def bidir_unsorted(encoder: BiEncoder, texts: list[str], batch_size: int, device: str) -> torch.Tensor:
    """bidir's tokenization and model, batches taken in input order (no length sorting)."""
    ids, _ = tokenize(encoder.tokenizer, texts, encoder.config.max_length)
    out = []
    for i in range(0, len(ids), batch_size):
        input_ids, mask = pad_batch(ids[i : i + batch_size], encoder.tokenizer.pad_token_id)
        out.append(encoder(input_ids.to(device), mask.to(device)).cpu())
    return torch.cat(out)


def bench_dtype(
    name: str, ckpt: Path, tokenizer, texts: list[str], bs: int, repeats: int, device: str
) -> dict:
    """Check, then time the three paths at one dtype."""
    dtype = DTYPES[name]
    hf = AutoModel.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    encoder = BiEncoder.from_pretrained(ckpt, dtype=dtype, device=device).eval()
    runs = {
        PATHS[0]: lambda t: transformers_loop(hf, tokenizer, t, bs, encoder.config.max_length, device),
        PATHS[1]: lambda t: bidir_unsorted(encoder, t, bs, device),
        PATHS[2]: lambda t: torch.from_numpy(encoder.encode(t, batch_size=bs)),
    }
    check_first = {}
    with torch.inference_mode():
        first = {path: run(texts[:bs]) for path, run in runs.items()}  # warm-up, and the correctness check
        for path in PATHS[1:]:
            agree = agreement(first[path], first[PATHS[0]])
            diff, cos = agree["max_abs_diff"], agree["min_cosine"]
            check_first[path] = {"max_abs_diff": diff, "min_cosine": cos}
            check(
                f"{name} {path} vs transformers loop",
                f"max |diff| {diff:.2e}, min cosine {cos:.6f}",
                diff <= 1e-4 if dtype == torch.float32 else cos >= 0.99,
                f"bench_encode: {name} {path} disagrees with the transformers baseline",
            )
        times = interleaved(runs, [(texts,)] * repeats, device=device)
    med = medians(times)
    return {
        "seconds": times,
        "median_s": med,
        "sentences_per_s": {path: len(texts) / s for path, s in med.items()},
        "encode_vs_transformers": med[PATHS[0]] / med[PATHS[2]],
        "encode_vs_unsorted": med[PATHS[1]] / med[PATHS[2]],
        "unsorted_vs_transformers": med[PATHS[0]] / med[PATHS[1]],
        "check_first_batch": check_first,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path; the median is reported")
    ap.add_argument("--limit", type=int, default=None, help="use the first N sentences only")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    ap.add_argument("--json", type=Path, default=None, help="append one JSON line with all figures")
    ap.add_argument(
        "--model",
        default="smollm2-135m",
        help="a bidir checkpoint folder (default: the embedded default model)",
    )
    args = ap.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if unknown := [d for d in dtypes if d not in DTYPES]:
        sys.exit(f"bench_encode: unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    if min(args.batch_size, args.repeats, args.limit or 1) < 1:
        sys.exit("bench_encode: --batch-size, --repeats and --limit must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()

    texts = load_sentences(args.limit)
    try:
        ckpt = resolve_source(args.model)
    except BidirError as e:
        sys.exit(f"bench_encode: {e}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = torch.cuda.get_device_name(0) if device == "cuda" else None
    print(f"measuring on CUDA: {cuda}" if cuda else f"no CUDA: measuring on CPU: {cpu_name()}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} CPU threads"
    )
    busy = warn_if_busy()

    bs = args.batch_size
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    max_length = (read_encoder_config(ckpt) or EncoderConfig()).max_length  # what both paths truncate to
    lengths = [len(row) for row in tokenize(tokenizer, texts, max_length)[0]]
    in_order = [list(range(i, min(i + bs, len(texts)))) for i in range(0, len(texts), bs)]

    def padded(batches: list[list[int]]) -> int:  # tokens the model runs on, padding included
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    shapes = {
        "sentences": len(texts),
        "batch_size": bs,
        "batches": len(in_order),
        "real_tokens": sum(lengths),
        "max_tokens": max(lengths),
        "padded_tokens_input_order": padded(in_order),
        "padded_tokens_length_sorted": padded(length_sorted_batches(lengths, bs)),
    }
    print(f"{ckpt.name}: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))

    results = {name: bench_dtype(name, ckpt, tokenizer, texts, bs, args.repeats, device) for name in dtypes}

    print(f"\n{'dtype':<6} {'path':<18} {'median s':>9} {'sent/s':>9}")
    for name, r in results.items():
        for path in PATHS:
            print(f"{name:<6} {path:<18} {r['median_s'][path]:>9.2f} {r['sentences_per_s'][path]:>9.1f}")
        print(
            f"{name:<6} speed ratios: encode/transformers {r['encode_vs_transformers']:.2f}x, "
            f"encode/unsorted {r['encode_vs_unsorted']:.2f}x, "
            f"unsorted/transformers {r['unsorted_vs_transformers']:.2f}x"
        )
    if args.json:
        record = {
            "benchmark": "bench_encode",
            **environment(busy_cores_start=busy),
            "model": str(args.model),
            "shapes": {**shapes, "max_length": max_length, "repeats": args.repeats},
            "results": results,
        }
        append_jsonl(args.json, record)


if __name__ == "__main__":
    main()
