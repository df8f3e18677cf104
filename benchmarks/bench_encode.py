"""Encoding speed: BiEncoder.encode, padded and packed, vs sentence-transformers' encode and the transformers loop.

Paths, each timed from texts to L2-normalized, mean-pooled float32 embeddings, tokenizing included, same weights,
dtype and batch size:

- transformers loop:     AutoModel (a LlamaModel, is_causal false) + AutoTokenizer on the embedded default
                         checkpoint; tokenizer(batch, padding=True, truncation=True, max_length=the checkpoint's) on
                         input-order batches, masked mean, normalize.
- sentence-transformers: SentenceTransformer(checkpoint).encode(texts, batch_size): its own length sorting, each
                         batch padded to its longest text.
- bidir padded:          BiEncoder.encode(packed=False): length-sorted batches of batch_size texts, each padded to
                         its longest.
- bidir packed:          BiEncoder.encode(packed=True): length-sorted packed batches (bidir_core.packed: one token
                         stream, no padding) of at most --max-tokens real tokens and batch_size texts, with the
                         device's default attention kernel; --kernels adds a row per other kernel (dense, flex).

Texts (--corpus): "mixed" (default): Cranfield abstracts (~250 tokens) and STS-B train sentences (~15 tokens),
shuffled (harness.mixed_corpus, 28 % long documents); "stsb": both sentence columns of STS-B dev. Each path first
runs on the first batch (the warm-up), whose embeddings are checked against the transformers loop; then each path is
timed --repeats times, interleaved. The table gives medians, real tokens/s (padding not counted) and the ratios.
Runs on CUDA when available, else on CPU, and says which.

    nox -s bench -- --json runs/bench.jsonl
    python benchmarks/bench_encode.py [--corpus mixed|stsb] [--limit 1000] [--batch-size 32] [--dtypes fp32,bf16]
                                      [--max-tokens 4096] [--kernels dense,flex] [--repeats 3] [--threads N]
                                      [--json PATH]
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
    mixed_corpus,
    warn_if_busy,
)
from transformers import AutoModel, AutoTokenizer

from bidir_core.batching import length_sorted_batches
from bidir_core.checkpoint import EncoderConfig, read_encoder_config
from bidir_core.encoder import PACKED_TOKENS, BiEncoder
from bidir_core.errors import BidirError
from bidir_core.packed_attention import KERNELS, default_kernel
from bidir_core.sources import resolve_source
from bidir_core.tokenization import tokenize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE = "transformers loop"


def load_sentences(corpus: str, limit: int | None) -> list[str]:
    if corpus == "mixed":
        return mixed_corpus("bench_encode", limit or 1000)
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


def bench_dtype(name: str, ckpt: Path, tokenizer, texts: list[str], args, device: str, tokens: int) -> dict:
    """Check, then time the paths at one dtype."""
    from sentence_transformers import SentenceTransformer

    dtype, bs = DTYPES[name], args.batch_size
    hf = AutoModel.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    encoder = BiEncoder.from_pretrained(ckpt, dtype=dtype, device=device).eval()
    st = SentenceTransformer(str(ckpt), device=device, model_kwargs={"dtype": dtype})
    auto = default_kernel(device)

    def packed(kernel):
        def run(t):
            encoder.model.attention_kernel = kernel
            return torch.from_numpy(encoder.encode(t, batch_size=bs, packed=True, max_tokens=args.max_tokens))

        return run

    runs = {
        BASELINE: lambda t: transformers_loop(hf, tokenizer, t, bs, encoder.config.max_length, device),
        "sentence-transformers": lambda t: torch.from_numpy(
            st.encode(t, batch_size=bs, convert_to_numpy=True)
        ),
        "bidir padded": lambda t: torch.from_numpy(encoder.encode(t, batch_size=bs, packed=False)),
        "bidir packed": packed("auto"),
    }
    for kernel in args.kernels:
        if kernel not in (auto, "auto"):
            runs[f"bidir packed {kernel}"] = packed(kernel)
    check_first = {}
    with torch.inference_mode():
        first = {path: run(texts[:bs]) for path, run in runs.items()}  # warm-up, and the correctness check
        for path in list(runs)[1:]:
            agree = agreement(first[path], first[BASELINE])
            diff, cos, median = agree["max_abs_diff"], agree["min_cosine"], agree["median_cosine"]
            check_first[path] = {"max_abs_diff": diff, "min_cosine": cos, "median_cosine": median}
            check(
                f"{name} {path} vs {BASELINE}",
                f"max |diff| {diff:.2e}, min cosine {cos:.6f}, median cosine {median:.6f}",
                # bf16: a bf16 residual stream rounds differently in every kernel and layout (padded or packed, one
                # library or another), and over 30 layers a few long texts drift (min cosine ~0.87 against the
                # padded bf16 loop, as far as a padded bf16 batch is from fp32): checked on the median row.
                diff <= 1e-4 if dtype == torch.float32 else median >= 0.99,
                f"bench_encode: {name} {path} disagrees with the transformers baseline",
            )
        timed_runs = {path: run for path, run in runs.items() if path != BASELINE or args.time_transformers}
        times = interleaved(timed_runs, [(texts,)] * args.repeats, device=device)
    med = medians(times)
    tps = {path: tokens / s for path, s in med.items()}
    ratios = {
        "packed_vs_padded": med["bidir padded"] / med["bidir packed"],
        "packed_vs_sentence_transformers": med["sentence-transformers"] / med["bidir packed"],
        "padded_vs_sentence_transformers": med["sentence-transformers"] / med["bidir padded"],
    }
    if BASELINE in med:
        ratios["packed_vs_transformers"] = med[BASELINE] / med["bidir packed"]
    return {
        "seconds": times,
        "median_s": med,
        "tokens_per_s": tps,
        "sentences_per_s": {path: len(texts) / s for path, s in med.items()},
        "ratios": ratios,
        "auto_kernel": auto,
        "check_first_batch": check_first,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", choices=("mixed", "stsb"), default="mixed")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument(
        "--max-tokens", type=int, default=PACKED_TOKENS, help="bidir packed: real tokens per batch"
    )
    ap.add_argument(
        "--kernels", default="", help="comma-separated packed kernels to time besides the default"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path; the median is reported")
    ap.add_argument(
        "--no-time-transformers",
        dest="time_transformers",
        action="store_false",
        help="the transformers loop checks the first batch only (it pads input-order batches: the slowest path)",
    )
    ap.add_argument(
        "--limit", type=int, default=None, help="use the first N texts only (mixed: default 1000)"
    )
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
    args.kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if unknown := [k for k in args.kernels if k not in KERNELS]:
        sys.exit(f"bench_encode: unknown kernel {unknown[0]!r}; choose from {', '.join(KERNELS)}")
    if min(args.batch_size, args.repeats, args.limit or 1, args.max_tokens) < 1:
        sys.exit("bench_encode: --batch-size, --repeats, --limit and --max-tokens must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()

    texts = load_sentences(args.corpus, args.limit)
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
    max_length = (read_encoder_config(ckpt) or EncoderConfig()).max_length  # what every path truncates to
    lengths = [len(row) for row in tokenize(tokenizer, texts, max_length)[0]]
    in_order = [list(range(i, min(i + bs, len(texts)))) for i in range(0, len(texts), bs)]

    def padded(batches: list[list[int]]) -> int:  # tokens the model runs on, padding included
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    shapes = {
        "corpus": args.corpus,
        "texts": len(texts),
        "batch_size": bs,
        "real_tokens": sum(lengths),
        "max_tokens_per_text": max(lengths),
        "padded_tokens_input_order": padded(in_order),
        "padded_tokens_length_sorted": padded(length_sorted_batches(lengths, bs)),
        "packed_batches": len(length_sorted_batches(lengths, bs, args.max_tokens, padded=False)),
        "packed_max_tokens": args.max_tokens,
    }
    print(f"{ckpt.name}: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))

    tokens = sum(lengths)
    results = {name: bench_dtype(name, ckpt, tokenizer, texts, args, device, tokens) for name in dtypes}

    print(f"\n{'dtype':<6} {'path':<26} {'median s':>9} {'tokens/s':>10}")
    for name, r in results.items():
        for path in r["median_s"]:
            print(f"{name:<6} {path:<26} {r['median_s'][path]:>9.2f} {r['tokens_per_s'][path]:>10.1f}")
        print(f"{name:<6} ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items()))
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
